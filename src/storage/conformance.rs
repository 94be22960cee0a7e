//! The behaviour every [`Storage`] backend must show; integration tests run it per backend.

use bytes::Bytes;

use super::{Storage, StorageError, WriteMode};

/// Runs the conformance checks against an empty store, panicking on the first violation.
pub async fn run(s: &dyn Storage) {
    // Missing objects.
    assert!(matches!(
        s.get("a/missing").await,
        Err(StorageError::NotFound(_))
    ));
    assert_eq!(s.head("a/missing").await.unwrap(), None);
    assert!(!s.exists("a/missing").await.unwrap());
    s.delete("a/missing")
        .await
        .expect("deleting a missing key succeeds");
    assert!(
        s.list("").await.unwrap().is_empty(),
        "store must start empty"
    );

    // Put / get / overwrite.
    s.put("a/b/one", Bytes::from_static(b"first"))
        .await
        .unwrap();
    assert_eq!(&s.get("a/b/one").await.unwrap()[..], b"first");
    s.put("a/b/one", Bytes::from_static(b"second!"))
        .await
        .unwrap();
    assert_eq!(&s.get("a/b/one").await.unwrap()[..], b"second!");
    assert_eq!(s.head("a/b/one").await.unwrap().unwrap().size, 7);
    s.put("a/empty", Bytes::new()).await.unwrap();
    assert_eq!(s.get("a/empty").await.unwrap().len(), 0);

    // A larger object round-trips byte for byte.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    s.put("b/big", Bytes::from(big.clone())).await.unwrap();
    assert_eq!(s.get("b/big").await.unwrap(), Bytes::from(big.clone()));
    // Ranged reads: inside, across the end, past the end; a missing object.
    assert_eq!(
        s.get_range("b/big", 1000, 5000).await.unwrap(),
        big[1000..6000]
    );
    let n = big.len() as u64;
    assert_eq!(
        s.get_range("b/big", n - 10, 100).await.unwrap(),
        big[big.len() - 10..]
    );
    assert!(s.get_range("b/big", n + 5, 10).await.unwrap().is_empty());
    assert!(matches!(
        s.get_range("a/missing", 0, 10).await,
        Err(StorageError::NotFound(_))
    ));

    // Listing: sorted, prefix-filtered, sizes right.
    s.put("a/b/two", Bytes::from_static(b"2")).await.unwrap();
    s.put("ab", Bytes::from_static(b"x")).await.unwrap();
    let keys: Vec<String> = s
        .list("a/")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(keys, ["a/b/one", "a/b/two", "a/empty"]);
    let keys: Vec<String> = s
        .list("a")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(keys, ["a/b/one", "a/b/two", "a/empty", "ab"]);
    let all = s.list("").await.unwrap();
    assert_eq!(all.len(), 5);
    assert!(all.windows(2).all(|w| w[0].key < w[1].key));
    assert_eq!(all.iter().find(|m| m.key == "a/b/two").unwrap().size, 1);

    // Delete.
    s.delete("a/b/one").await.unwrap();
    assert!(!s.exists("a/b/one").await.unwrap());
    assert_eq!(s.list("a/b/").await.unwrap().len(), 1);

    // Streaming writes: invisible until finished, then whole; aborted or dropped writers leave
    // nothing; finishing replaces an existing object.
    let mut w = s.writer("c/streamed").await.unwrap();
    let mut expect = Vec::new();
    for i in 0..40u32 {
        let chunk: Vec<u8> = (0..100_000u32)
            .map(|j| ((i * 31 + j) % 253) as u8)
            .collect();
        expect.extend_from_slice(&chunk);
        w.write(Bytes::from(chunk)).await.unwrap();
        if i == 20 {
            assert!(
                !s.exists("c/streamed").await.unwrap(),
                "visible before finish"
            );
        }
    }
    assert_eq!(w.finish().await.unwrap(), expect.len() as u64);
    assert_eq!(s.get("c/streamed").await.unwrap(), Bytes::from(expect));
    let mut w = s.writer("c/aborted").await.unwrap();
    w.write(Bytes::from_static(b"partial")).await.unwrap();
    w.abort().await;
    let mut w = s.writer("c/dropped").await.unwrap();
    w.write(Bytes::from_static(b"partial")).await.unwrap();
    drop(w);
    let mut w = s.writer("c/streamed").await.unwrap();
    w.write(Bytes::from_static(b"replaced")).await.unwrap();
    w.finish().await.unwrap();
    assert_eq!(&s.get("c/streamed").await.unwrap()[..], b"replaced");
    let keys: Vec<String> = s
        .list("c/")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(
        keys,
        ["c/streamed"],
        "aborted and dropped writers leave nothing"
    );
    for i in ["c/streamed"] {
        s.delete(i).await.unwrap();
    }

    // Conditional create: a new key is written; an existing one is left untouched, for
    // whole-object and streamed writes alike.
    s.put_with("d/once", Bytes::from_static(b"v1"), WriteMode::CreateNew)
        .await
        .unwrap();
    assert!(matches!(
        s.put_with("d/once", Bytes::from_static(b"v2"), WriteMode::CreateNew)
            .await,
        Err(StorageError::AlreadyExists(_))
    ));
    assert_eq!(&s.get("d/once").await.unwrap()[..], b"v1");
    let mut w = s.writer_with("d/once", WriteMode::CreateNew).await.unwrap();
    w.write(Bytes::from(vec![7u8; 100_000])).await.unwrap();
    assert!(matches!(
        w.finish().await,
        Err(StorageError::AlreadyExists(_))
    ));
    assert_eq!(&s.get("d/once").await.unwrap()[..], b"v1");
    let mut w = s.writer_with("d/new", WriteMode::CreateNew).await.unwrap();
    w.write(Bytes::from_static(b"fresh")).await.unwrap();
    w.finish().await.unwrap();
    assert_eq!(&s.get("d/new").await.unwrap()[..], b"fresh");
    assert_eq!(
        s.list("d/").await.unwrap().len(),
        2,
        "a refused create leaves nothing behind"
    );
    // A large streamed object (several S3 multipart parts), created once, refused the second
    // time without a trace.
    let part = |i: u32| -> Bytes {
        Bytes::from(
            (0..1_000_000u32)
                .map(|j| ((i * 17 + j) % 241) as u8)
                .collect::<Vec<u8>>(),
        )
    };
    let mut w = s
        .writer_with("d/large", WriteMode::CreateNew)
        .await
        .unwrap();
    let mut expect = Vec::new();
    for i in 0..18 {
        expect.extend_from_slice(&part(i));
        w.write(part(i)).await.unwrap();
    }
    assert_eq!(w.finish().await.unwrap(), expect.len() as u64);
    assert_eq!(s.get("d/large").await.unwrap(), Bytes::from(expect));
    let mut w = s
        .writer_with("d/large", WriteMode::CreateNew)
        .await
        .unwrap();
    for i in 0..18 {
        w.write(part(i + 1)).await.unwrap();
    }
    assert!(matches!(
        w.finish().await,
        Err(StorageError::AlreadyExists(_))
    ));
    assert_eq!(s.get_range("d/large", 0, 3).await.unwrap(), part(0)[..3]);
    for k in ["d/once", "d/new", "d/large"] {
        s.delete(k).await.unwrap();
    }

    // A prefix removed whole; its neighbours stay.
    for k in ["p/x/1", "p/x/2", "p/y"] {
        s.put(k, Bytes::from_static(b"v")).await.unwrap();
    }
    s.delete_prefix("p/x/").await.unwrap();
    let left: Vec<String> = s
        .list("p/")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(left, ["p/y"]);
    s.delete_prefix("p/none/").await.unwrap();
    s.delete("p/y").await.unwrap();

    // Bad keys are refused.
    for bad in ["", "/abs", "a/../b", "a//b", "./a"] {
        assert!(
            matches!(
                s.put(bad, Bytes::new()).await,
                Err(StorageError::InvalidKey(_))
            ),
            "key {bad:?} must be refused"
        );
    }
}
