//! Tests of fleet specs and of the gate their members share.

use super::*;
use futures_util::FutureExt;

const TABLES: &str = r#"
tables:
  - source: public.users
    target: public.users
    key: id
    columns:
      id: id
"#;

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).expect("write");
    p
}

fn fleet(text: &str) -> Result<Fleet, SpecError> {
    let dir = tempfile::tempdir().expect("tempdir");
    match load(&write(&dir, "fleet.yaml", text))? {
        Loaded::Fleet(f) => Ok(f),
        Loaded::One(_) => panic!("not a fleet"),
    }
}

fn invalid(r: Result<Fleet, SpecError>) -> Vec<String> {
    match r {
        Err(SpecError::Invalid(p)) => p,
        Err(e) => panic!("not an invalid spec: {e}"),
        Ok(_) => panic!("accepted"),
    }
}

#[test]
fn members_get_the_fleets_tables_and_their_own_servers_in_spec_order() {
    let f = fleet(&format!(
        "members:\n\
         \x20 - {{name: b-2, source: 'postgres://m@db-a:5432/t2', target: 'postgres://m@db-x:5432/t2'}}\n\
         \x20 - {{name: a-1, source: 'postgres://m@db-b:5433/t1', target: 'postgres://m@db-x:5432/t1'}}\n\
         limits:\n  per_host: 2\n{TABLES}"
    ))
    .expect("fleet");
    let names: Vec<_> = f.members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["b-2", "a-1"]);
    assert_eq!(f.per_host, Some(2));
    let m = &f.members[1].spec;
    assert_eq!(m.member.as_deref(), Some("a-1"));
    assert_eq!(server_of(&m.source), "db-b:5433");
    assert_eq!(server_of(&m.target), "db-x:5432");
    assert_eq!(m.tables[0].source, "public.users");
}

#[test]
fn members_file_is_read_beside_the_spec() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        &dir,
        "list.yaml",
        "- {name: t1, source: 'postgres://m@h:1/a', target: 'postgres://m@h:2/a'}\n",
    );
    let spec = write(
        &dir,
        "fleet.yaml",
        &format!("members_file: list.yaml\n{TABLES}"),
    );
    let Ok(Loaded::Fleet(f)) = load(&spec) else {
        panic!("not a fleet")
    };
    assert_eq!(f.members.len(), 1);
    assert_eq!(f.per_host, None);
}

#[test]
fn bad_member_lists_are_refused_with_every_problem() {
    let p = invalid(fleet(&format!(
        "source: 'postgres://m@h:1/a'\n\
         members:\n\
         \x20 - {{name: Bad Name, source: 'postgres://m@h:1/a', target: 'postgres://m@h:2/a'}}\n\
         \x20 - {{name: t, source: 'postgres://m@h:1/b', target: 'postgres://m@h:2/b'}}\n\
         \x20 - {{name: t, source: 'postgres://m@h:1/c', target: 'postgres://m@h:2/c'}}\n\
         limits: {{per_host: 0}}\n{TABLES}"
    )));
    let all = p.join("\n");
    for needle in [
        "\"Bad Name\"",
        "\"t\" is used twice",
        "members replaces source and target",
        "per_host: must be at least 1",
    ] {
        assert!(all.contains(needle), "{needle}: {all}");
    }
    let p = invalid(fleet(&format!(
        "members:\n  - {{name: t, source: 'nonsense ===', target: 'postgres://m@h:2/a'}}\n{TABLES}"
    )));
    assert!(p[0].starts_with("member t: source"), "{p:?}");
}

#[test]
fn selecting_an_unknown_member_is_bad_input() {
    let f = fleet(&format!(
        "members:\n  - {{name: t1, source: 'postgres://m@h:1/a', target: 'postgres://m@h:2/a'}}\n{TABLES}"
    ))
    .expect("fleet");
    let p = match f.select(&["t9".into()]) {
        Err(SpecError::Invalid(p)) => p,
        _ => panic!("accepted"),
    };
    assert!(p[0].contains("\"t9\""), "{p:?}");
}

#[tokio::test]
async fn gate_lets_one_copy_per_server_and_the_pool_bounds_the_fleet() {
    let gate = HostGate::new(Some(1), 2);
    let spec = |s: &str, t: &str| {
        let mut f = fleet(&format!(
            "members:\n  - {{name: x, source: 'postgres://m@{s}/a', target: 'postgres://m@{t}/a'}}\n{TABLES}"
        ))
        .expect("fleet");
        gate.member(&f.members.remove(0).spec, 1000)
    };
    let (ab, cb, cd, ef) = (
        spec("a:1", "b:1"),
        spec("c:1", "b:1"),
        spec("c:1", "d:1"),
        spec("e:1", "f:1"),
    );
    let first = ab.copy().await;
    // b is busy: a copy into it waits, a copy elsewhere goes.
    assert!(cb.copy().now_or_never().is_none());
    let second = cd.copy().await;
    // Two copies hold the pool's two slots: even free servers wait.
    assert!(ef.copy().now_or_never().is_none());
    // An index build takes no pool slot, only its server.
    assert!(ab.build().now_or_never().is_none());
    assert!(ef.build().now_or_never().is_some());
    drop(first);
    assert!(cb.copy().now_or_never().is_none(), "c is still busy");
    drop(second);
    assert!(cb.copy().now_or_never().is_some());
}

#[test]
fn fleet_eta_counts_the_rows_of_members_still_waiting_at_the_fleets_pace() {
    let started = Progress {
        rows_done: 50,
        rows_total: 100,
        rate: 10.0,
        eta: Some(5.0),
    };
    let waiting = Progress {
        rows_done: 0,
        rows_total: 100,
        rate: 0.0,
        eta: None,
    };
    // 50 done in 5 s: 10 rows/s for the fleet; 50 + 100 left: 15 s, not the 5 s of the one
    // member that has a rate.
    assert_eq!(fleet_eta(&[started, waiting]), Some(15.0));
    // Alone, it is its own estimate.
    assert_eq!(fleet_eta(&[started]), Some(5.0));
    // Nothing started: no estimate rather than zero.
    assert_eq!(fleet_eta(&[waiting, waiting]), None);
    // A slow member's own estimate is a floor.
    let slow = Progress {
        rows_done: 1,
        rows_total: 1_000,
        rate: 0.2,
        eta: Some(4_995.0),
    };
    assert_eq!(fleet_eta(&[started, slow]), Some(4_995.0));
}
