use super::*;

#[tokio::test]
async fn starts_logical_cluster_and_stops() {
    let cluster = Cluster::start(ClusterOptions::default())
        .await
        .expect("cluster starts");
    let (client, conn) = tokio_postgres::connect(&cluster.dsn("postgres"), tokio_postgres::NoTls)
        .await
        .expect("connect");
    let task = tokio::spawn(conn);
    let row = client
        .query_one("SHOW wal_level", &[])
        .await
        .expect("show wal_level");
    assert_eq!(row.get::<_, String>(0), "logical");
    let row = client
        .query_one("SHOW server_encoding", &[])
        .await
        .expect("show encoding");
    assert_eq!(row.get::<_, String>(0), "UTF8");
    drop(client);
    let _ = task.await;
    let dir = cluster.root();
    cluster.stop().await.expect("cluster stops");
    assert!(!dir.exists(), "cluster directory removed");
}

#[tokio::test]
async fn extra_conf_overrides_defaults() {
    let opts = ClusterOptions {
        wal_level: "replica".into(),
        extra_conf: vec![("shared_buffers".into(), "'32MB'".into())],
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(opts).await.expect("cluster starts");
    let (client, conn) = tokio_postgres::connect(&cluster.dsn("postgres"), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let wal: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .expect("show")
        .get(0);
    let buffers: String = client
        .query_one("SHOW shared_buffers", &[])
        .await
        .expect("show")
        .get(0);
    assert_eq!(wal, "replica");
    assert_eq!(buffers, "32MB");
    // Drop stops the server without an explicit stop().
}

#[tokio::test]
async fn start_failure_quotes_the_server_log() {
    let opts = ClusterOptions {
        extra_conf: vec![("no_such_setting_xyz".into(), "1".into())],
        ..ClusterOptions::default()
    };
    let err = Cluster::start(opts).await.expect_err("bad setting");
    assert!(matches!(err, ClusterError::Start { .. }), "{err:?}");
    assert!(err.to_string().contains("no_such_setting_xyz"), "{err}");
}

#[tokio::test]
async fn taken_port_is_retried() {
    let cluster = Cluster::start(ClusterOptions::default())
        .await
        .expect("cluster starts");
    let mut second = Cluster::start(ClusterOptions::default())
        .await
        .expect("second cluster starts");
    // Restart the second cluster on the first one's port: the conflict is reported as one.
    second.pg_ctl_stop_sync("fast");
    let err = second
        .try_start(cluster.port())
        .await
        .expect_err("port is taken");
    assert!(err.is_port_conflict(), "{err}");
}
