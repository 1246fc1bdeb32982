use super::*;

fn store() -> (tempfile::TempDir, Store) {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(&d.path().join("m.redb")).unwrap();
    (d, s)
}

fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn create_commit_remove() {
    let (_d, s) = store();
    let a = s
        .write(|tx| tx.create(Kind::Active, "a", None, labels(&[("x", "1")]), None))
        .unwrap();
    assert_eq!(a.id, 1);
    // Parent must exist and be committed.
    let e = s
        .write(|tx| tx.create(Kind::Active, "b", Some("nope"), labels(&[]), None))
        .unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::NotFound);
    let e = s
        .write(|tx| tx.create(Kind::View, "b", Some("a"), labels(&[]), None))
        .unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument);
    let e = s
        .write(|tx| tx.create(Kind::Active, "a", None, labels(&[]), None))
        .unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::AlreadyExists);
    let c = s
        .write(|tx| {
            tx.commit_active(
                "a",
                "A",
                labels(&[("y", "2")]),
                None,
                (10, 1),
                LayerMeta::default(),
            )
        })
        .unwrap();
    assert_eq!((c.id, c.kind), (1, Kind::Committed));
    assert_eq!(c.labels, labels(&[("y", "2")]));
    assert!(s.read(|tx| tx.get("a")).unwrap().is_none());
    let b = s
        .write(|tx| tx.create(Kind::Active, "b", Some("A"), labels(&[]), None))
        .unwrap();
    // Failed creates roll back entirely, id counter included.
    assert_eq!(b.id, 2);
    let e = s.write(|tx| tx.remove("A")).unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::FailedPrecondition);
    s.write(|tx| tx.remove("b")).unwrap();
    s.write(|tx| tx.remove("A")).unwrap();
    assert!(s.read(|tx| tx.id_map()).unwrap().is_empty());
    // Ids are never reused.
    let n = s
        .write(|tx| tx.create(Kind::Active, "n", None, labels(&[]), None))
        .unwrap();
    assert_eq!(n.id, 3);
}

#[test]
fn commit_checks() {
    let (_d, s) = store();
    s.write(|tx| tx.create(Kind::Active, "base", None, labels(&[]), None))
        .unwrap();
    s.write(|tx| tx.commit_active("base", "B", labels(&[]), None, (0, 0), LayerMeta::default()))
        .unwrap();
    s.write(|tx| tx.create(Kind::View, "v", Some("B"), labels(&[]), None))
        .unwrap();
    let e = s
        .write(|tx| tx.commit_active("v", "V", labels(&[]), None, (0, 0), LayerMeta::default()))
        .unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::FailedPrecondition);
    s.write(|tx| tx.create(Kind::Active, "x", None, labels(&[]), None))
        .unwrap();
    let e = s
        .write(|tx| tx.commit_active("x", "B", labels(&[]), None, (0, 0), LayerMeta::default()))
        .unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::AlreadyExists);
    let e = s
        .write(|tx| {
            tx.commit_active(
                "missing",
                "M",
                labels(&[]),
                None,
                (0, 0),
                LayerMeta::default(),
            )
        })
        .unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::NotFound);
}

#[test]
fn rebase_on_commit() {
    let (_d, s) = store();
    s.write(|tx| tx.create(Kind::Active, "l1", None, labels(&[]), None))
        .unwrap();
    s.write(|tx| tx.commit_active("l1", "L1", labels(&[]), None, (0, 0), LayerMeta::default()))
        .unwrap();
    s.write(|tx| tx.create(Kind::Active, "l2", None, labels(&[]), None))
        .unwrap();
    let r = s
        .write(|tx| {
            tx.commit_active(
                "l2",
                "L2",
                labels(&[]),
                Some("L1"),
                (0, 0),
                LayerMeta::default(),
            )
        })
        .unwrap();
    assert_eq!(r.parent.as_deref(), Some("L1"));
    let chain = s.read(|tx| tx.parents(&r)).unwrap();
    assert_eq!(chain.len(), 1);
    assert!(s.read(|tx| tx.has_children(chain[0].1.id)).unwrap());
    // A different parent than the one it has is refused.
    s.write(|tx| tx.create(Kind::Active, "l3", Some("L2"), labels(&[]), None))
        .unwrap();
    let e = s
        .write(|tx| {
            tx.commit_active(
                "l3",
                "L3",
                labels(&[]),
                Some("L1"),
                (0, 0),
                LayerMeta::default(),
            )
        })
        .unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument);
}

#[test]
fn survives_reopen_and_refuses_newer_schema() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("m.redb");
    {
        let s = Store::open(&p).unwrap();
        s.write(|tx| tx.create(Kind::Active, "k", None, labels(&[("a", "b")]), None))
            .unwrap();
    }
    let s = Store::open(&p).unwrap();
    assert_eq!(
        s.read(|tx| tx.require("k")).unwrap().labels,
        labels(&[("a", "b")])
    );
    s.write(|tx| {
        tx.tx.open_table(META)?.insert(SCHEMA_KEY, 99)?;
        Ok(())
    })
    .unwrap();
    drop(s);
    let e = Store::open(&p).unwrap_err();
    assert!(e.to_string().contains("schema version 99"), "{e}");
}

#[test]
fn failed_write_rolls_back() {
    let (_d, s) = store();
    let r: Result<()> = s.write(|tx| {
        tx.create(Kind::Active, "gone", None, labels(&[]), None)?;
        Err(Error::internal("boom"))
    });
    assert!(r.is_err());
    assert!(s.read(|tx| tx.get("gone")).unwrap().is_none());
}
