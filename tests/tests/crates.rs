//! The crate boundaries of docs/architecture.md, read from `cargo metadata`: the two
//! sides of the wire never depend on each other, and no product crate on the lab.

use std::collections::{BTreeMap, BTreeSet};

/// Each workspace package's non-optional normal dependencies on other workspace packages.
fn workspace_deps() -> anyhow::Result<BTreeMap<String, BTreeSet<String>>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let packages = meta["packages"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("no packages in cargo metadata"))?;
    let names: BTreeSet<String> = packages
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect();
    let mut deps = BTreeMap::new();
    for p in packages {
        let name = p["name"].as_str().unwrap_or_default().to_owned();
        let own: BTreeSet<String> = p["dependencies"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["kind"].is_null() && d["optional"] != serde_json::Value::Bool(true))
            .filter_map(|d| d["name"].as_str())
            .filter(|d| names.contains(*d))
            .map(str::to_owned)
            .collect();
        deps.insert(name, own);
    }
    Ok(deps)
}

/// Everything `krate` depends on, directly or not.
fn closure(deps: &BTreeMap<String, BTreeSet<String>>, krate: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![krate.to_owned()];
    while let Some(k) = todo.pop() {
        for d in deps.get(&k).into_iter().flatten() {
            if seen.insert(d.clone()) {
                todo.push(d.clone());
            }
        }
    }
    seen
}

#[test]
fn coordinator_and_worker_do_not_depend_on_each_other() -> anyhow::Result<()> {
    let deps = workspace_deps()?;
    let coordinator = closure(&deps, "schemashift-coordinator");
    let worker = closure(&deps, "schemashift-worker");
    assert!(
        !coordinator.contains("schemashift-worker"),
        "coordinator depends on {coordinator:?}"
    );
    assert!(
        !worker.contains("schemashift-coordinator"),
        "worker depends on {worker:?}"
    );
    // Both read the change log through the same crate.
    assert!(coordinator.contains("schemashift-changelog"));
    assert!(worker.contains("schemashift-changelog"));
    Ok(())
}

#[test]
fn no_product_crate_depends_on_the_lab() -> anyhow::Result<()> {
    let deps = workspace_deps()?;
    for product in [
        "schemashift-proto",
        "schemashift-common",
        "schemashift-changelog",
        "schemashift-coordinator",
        "schemashift-worker",
        // The binary takes the lab only through its optional `lab` feature.
        "schemashift",
    ] {
        let all = closure(&deps, product);
        assert!(
            !all.contains("schemashift-lab"),
            "{product} depends on the lab through {all:?}"
        );
    }
    Ok(())
}
