//! `hello` lists what the daemon serves, so that a client can tell what an
//! older daemon lacks: the list must be exactly the operations that
//! docs/PROTOCOL.md §3 documents (one heading each), each of them must be
//! served (an unlisted one is `unknown_operation`), and the features must
//! name every key type that `key_create` accepts.

use keyhaven::wire::{Hello, PROTOCOL_VERSION};
use keyhaven_tests::*;

fn documented_operations() -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md")).unwrap();
    let mut ops: Vec<String> = doc
        .lines()
        .filter(|l| l.starts_with("### 3."))
        .filter_map(|l| l.split('`').nth(1).map(str::to_owned))
        .collect();
    ops.sort();
    ops
}

#[tokio::test(flavor = "multi_thread")]
async fn hello_lists_exactly_the_documented_operations_and_the_key_types() {
    let d = TestDaemon::start();
    let c = d.client().await;
    let hello =
        c.call(&Hello { protocol: PROTOCOL_VERSION, client: Some("hello-test".into()) }).await.unwrap();
    assert!(hello.server.starts_with("keyhavend/"), "{hello:?}");
    let documented = documented_operations();
    assert!(documented.len() >= 30, "PROTOCOL.md §3 headings: {documented:?}");
    assert_eq!(hello.operations, documented, "hello's operations vs PROTOCOL.md §3");
    // Every listed operation is served: none answers unknown_operation.
    for op in &hello.operations {
        if let Err(e) = c.call_raw(op, serde_json::json!({"not_a_field": 1})).await {
            assert_ne!(e.code(), Some(ErrorCode::UnknownOperation), "{op}: {e}");
        }
    }
    let e = c.call_raw("key_frobnicate", serde_json::json!({})).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::UnknownOperation), "{e}");
    // Each key type in `features` can be made, and no other.
    for feature in &hello.features {
        if let Some(kind) = feature.strip_prefix("key_type.") {
            let name = format!("acme/k-{}", kind.replace('-', ""));
            let made = c
                .call_raw(
                    "key_create",
                    serde_json::json!({"tenant": "acme", "key": &name[5..], "type": kind}),
                )
                .await;
            assert!(made.is_ok(), "{feature}: {made:?}");
        }
    }
    let e =
        c.call_raw("key_create", serde_json::json!({"tenant": "acme", "key": "x", "type": "ed25519"})).await;
    assert!(!hello.features.iter().any(|f| f == "key_type.ed25519"));
    // Refused, typed, saying why and what to use instead.
    let e = e.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{e}");
    for said in
        ["field `type`", "`ed25519` is not available", "cannot wrap an EdDSA private key", "ecdsa-p256"]
    {
        assert!(e.to_string().contains(said), "{said}: {e}");
    }
    let other =
        c.call_raw("key_create", serde_json::json!({"tenant": "acme", "key": "x", "type": "des"})).await;
    assert!(other.unwrap_err().to_string().contains("unknown key type `des`; one of aes256-gcm"));
    let mut sorted = hello.features.clone();
    sorted.sort();
    assert_eq!(sorted, hello.features, "features are sorted");
    assert!(hello.features.contains(&"key_create.rotate_every_secs".to_owned()));
}
