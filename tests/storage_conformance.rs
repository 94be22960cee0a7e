//! Every storage backend passes the same conformance suite.

use archiver::storage::fs::FsStorage;

#[tokio::test(flavor = "multi_thread")]
async fn fs_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let s = FsStorage::new(dir.path().join("store"));
    archiver::storage::conformance::run(&s).await;
    // No temporary files are left behind by atomic puts.
    let leftovers: Vec<_> = walk(dir.path())
        .into_iter()
        .filter(|p| p.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn walk(p: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path().display().to_string());
        }
    }
    out
}
