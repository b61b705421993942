use super::*;
use crate::cluster::test_cluster;

async fn split(client: &tokio_postgres::Client, name: Option<&str>) -> (String, String) {
    let row = client
        .query_one("SELECT split_first($1), split_last($1)", &[&name])
        .await
        .expect("split query");
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn split_functions_follow_the_rule() {
    let (cluster, client) = test_cluster().await;
    for f in SPLIT_FUNCTIONS {
        client.batch_execute(f).await.expect("create helper");
    }
    let cases: &[(Option<&str>, &str, &str)] = &[
        (Some("  Spaced  Out  "), "Spaced", "Out"),
        (Some("Cher"), "Cher", ""),
        (Some(""), "", ""),
        (Some("   "), "", ""),
        (None, "", ""),
        (Some("John Q Public"), "John Q", "Public"),
        (Some("John Doe"), "John", "Doe"),
        (Some("Mary Jane Watson"), "Mary Jane", "Watson"),
        (Some("van der Berg, Johann"), "van der Berg,", "Johann"),
        (Some("Dr. John Q. Public III"), "Dr. John Q. Public", "III"),
        (Some("김철수"), "김철수", ""),
        (Some("毛 泽东"), "毛", "泽东"),
        (Some(" Jean-Luc  Picard"), "Jean-Luc", "Picard"),
    ];
    for (input, first, last) in cases {
        let got = split(&client, *input).await;
        assert_eq!(
            got,
            (first.to_string(), last.to_string()),
            "split of {input:?}"
        );
    }
    let reverse: &[(&str, &str, &str)] = &[
        ("John", "Doe", "John Doe"),
        ("Cher", "", "Cher"),
        ("", "Solo", "Solo"),
        ("", "", ""),
        ("Mary Jane", "Watson", "Mary Jane Watson"),
    ];
    for (first, last, want) in reverse {
        let got: String = client
            .query_one("SELECT concat_names($1, $2)", &[first, last])
            .await
            .expect("concat query")
            .get(0);
        assert_eq!(&got, want, "concat_names({first:?}, {last:?})");
    }
    drop(client);
    cluster.stop().await.expect("stop");
}

/// The rule in Rust: trim spaces, split at the last space, trim the first part's end.
fn split_rule(name: &str) -> (String, String) {
    let t = name.trim_matches(' ');
    match t.rfind(' ') {
        None => (t.to_owned(), String::new()),
        Some(i) => (
            t[..i].trim_end_matches(' ').to_owned(),
            t[i + 1..].to_owned(),
        ),
    }
}

#[tokio::test]
async fn split_functions_agree_with_the_rule_on_random_names() {
    use rand::{Rng, SeedableRng};
    let (cluster, client) = test_cluster().await;
    for f in SPLIT_FUNCTIONS {
        client.batch_execute(f).await.expect("create helper");
    }
    // Short strings over a few letters, a multibyte one and spaces: every placement of
    // leading, trailing, repeated and missing spaces turns up.
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let alphabet = [' ', ' ', 'a', 'b', 'é', '泽'];
    let names: Vec<String> = (0..20_000)
        .map(|_| {
            let len = rng.gen_range(0..10);
            (0..len)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                .collect()
        })
        .collect();
    let rows = client
        .query(
            "SELECT split_first(n), split_last(n) FROM unnest($1::text[]) WITH ORDINALITY AS u(n, i) \
             ORDER BY i",
            &[&names],
        )
        .await
        .expect("split query");
    assert_eq!(rows.len(), names.len());
    for (name, row) in names.iter().zip(&rows) {
        let got: (String, String) = (row.get(0), row.get(1));
        assert_eq!(got, split_rule(name), "split of {name:?}");
    }
    drop(client);
    cluster.stop().await.expect("stop");
}

#[tokio::test]
async fn load_users_builds_the_mix() {
    let (cluster, client) = test_cluster().await;
    client.batch_execute(SOURCE_DDL).await.expect("source ddl");
    for f in SPLIT_FUNCTIONS {
        client.batch_execute(f).await.expect("create helper");
    }
    load_users(&client, 10_000).await.expect("load");
    let row = client
        .query_one(
            "SELECT count(*), min(id), max(id), count(DISTINCT email),
                    count(*) FILTER (WHERE split_last(full_name) = ''),
                    count(*) FILTER (WHERE split_first(full_name) LIKE '% %'),
                    count(*) FILTER (WHERE bio IS NULL),
                    count(*) FILTER (WHERE pg_column_size(bio) > 2000),
                    count(*) FILTER (WHERE concat_names(split_first(full_name), split_last(full_name))
                                           = btrim(full_name)),
                    count(*) FILTER (WHERE updated_at < created_at),
                    pg_table_size('public.users') / count(*)
             FROM public.users",
            &[],
        )
        .await
        .expect("stats");
    let n: i64 = row.get(0);
    let (min, max): (i64, i64) = (row.get(1), row.get(2));
    let emails: i64 = row.get(3);
    let single: i64 = row.get(4);
    let middle: i64 = row.get(5);
    let null_bio: i64 = row.get(6);
    let toasted: i64 = row.get(7);
    let round_trip: i64 = row.get(8);
    let backwards: i64 = row.get(9);
    let bytes_per_row: i64 = row.get(10);
    assert_eq!((n, min, max, emails), (10_000, 1, 10_000, 10_000));
    // 4% single names plus the complex ones without a space after trimming.
    assert!((250..=700).contains(&single), "single names: {single}");
    // 10% three-part names plus complex ones with several spaces.
    assert!((800..=1_300).contains(&middle), "middle names: {middle}");
    assert!((700..=1_300).contains(&null_bio), "null bios: {null_bio}");
    assert!((50..=200).contains(&toasted), "toasted bios: {toasted}");
    assert!(round_trip >= 9_900, "round trip accuracy: {round_trip}");
    assert_eq!(backwards, 0);
    assert!(
        (200..=450).contains(&bytes_per_row),
        "bytes per row: {bytes_per_row}"
    );
    // The sequence continues after the loaded ids.
    let next: i64 = client
        .query_one(
            "SELECT nextval(pg_get_serial_sequence('public.users', 'id'))",
            &[],
        )
        .await
        .expect("nextval")
        .get(0);
    assert_eq!(next, 10_001);

    // A large append takes the drop-and-rebuild path; the schema must come back unchanged.
    let schema = "SELECT string_agg(indexdef, '; ' ORDER BY indexname) FROM pg_indexes
                  WHERE schemaname = 'public' AND tablename = 'users'";
    let before: String = client.query_one(schema, &[]).await.expect("indexes").get(0);
    load_users(&client, REBUILD_INDEXES_FROM)
        .await
        .expect("append");
    let after: String = client.query_one(schema, &[]).await.expect("indexes").get(0);
    assert_eq!(before, after);
    let row = client
        .query_one(
            "SELECT count(*), max(id), (SELECT count(*) FROM pg_constraint
                                        WHERE conrelid = 'public.users'::regclass)
             FROM public.users",
            &[],
        )
        .await
        .expect("count");
    let total = 10_000 + REBUILD_INDEXES_FROM as i64;
    assert_eq!(
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2)
        ),
        (total, total, 2),
        "rows, max id, constraints (primary key and unique email)"
    );
    drop(client);
    cluster.stop().await.expect("stop");
}

#[test]
fn rust_name_mix_is_roughly_right() {
    let mut rng = rand::thread_rng();
    let names: Vec<String> = (0..10_000).map(|_| random_full_name(&mut rng)).collect();
    let spaces = |n: &str| n.trim().matches(' ').count();
    let two = names.iter().filter(|n| spaces(n) == 1).count();
    let single = names.iter().filter(|n| spaces(n) == 0).count();
    assert!((8_000..=9_000).contains(&two), "two-part names: {two}");
    assert!((250..=650).contains(&single), "single names: {single}");
    assert!(random_large_bio(&mut rng).len() > 8_192);
}

#[test]
fn spec_yaml_has_the_interface_shape() {
    let yaml = users_spec_yaml(
        "postgres://postgres@127.0.0.1:5501/src",
        "postgres://postgres@127.0.0.1:5502/dst db",
        4,
        Some(250_000),
    );
    let v: serde_norway::Value = serde_norway::from_str(&yaml).expect("valid yaml");
    assert_eq!(
        v["source"].as_str(),
        Some("postgres://postgres@127.0.0.1:5501/src")
    );
    assert_eq!(
        v["target"].as_str(),
        Some("postgres://postgres@127.0.0.1:5502/dst db")
    );
    assert_eq!(v["workers"].as_u64(), Some(4));
    let functions = v["functions"].as_sequence().expect("functions list");
    assert_eq!(functions.len(), 3);
    assert_eq!(
        functions[0].as_str().map(str::trim_end),
        Some(SPLIT_FUNCTIONS[0])
    );
    let table = &v["tables"][0];
    assert_eq!(table["source"].as_str(), Some("public.users"));
    assert_eq!(table["key"].as_str(), Some("id"));
    assert_eq!(table["shard_rows"].as_u64(), Some(250_000));
    assert_eq!(
        table["columns"]["first_name"].as_str(),
        Some("split_first(full_name)")
    );
    assert_eq!(
        table["reverse"]["full_name"].as_str(),
        Some("concat_names(first_name, last_name)")
    );
    let cols: Vec<&str> = table["columns"]
        .as_mapping()
        .expect("columns map")
        .keys()
        .filter_map(|k| k.as_str())
        .collect();
    assert_eq!(
        cols,
        [
            "id",
            "email",
            "first_name",
            "last_name",
            "bio",
            "created_at",
            "updated_at"
        ]
    );
    let without = users_spec_yaml("a", "b", 1, None);
    assert!(!without.contains("shard_rows"));
}
