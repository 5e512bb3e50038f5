//! The length-prefixed frame reader that both the daemon and the client use
//! (PROTOCOL.md §1), fed a byte stream in pieces of fuzzer-chosen sizes with
//! a small shared budget: every frame returned is exactly what was announced,
//! and the budget is whole again when the reader is dropped.
#![no_main]

use std::sync::Arc;

use keyhaven::frame::{FrameBudget, FrameReader};
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let piece = usize::from(data[0]).max(1);
    let stream = data[1..].to_vec();
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    let rt = RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().unwrap());
    rt.block_on(async move {
        let budget = Arc::new(FrameBudget::new(64 << 10));
        let (mut tx, rx) = tokio::io::duplex(4096);
        let writer = tokio::spawn(async move {
            for chunk in stream.chunks(piece) {
                if tx.write_all(chunk).await.is_err() {
                    return;
                }
            }
        });
        {
            let mut reader = FrameReader::with_budget(rx, budget.clone());
            while let Ok(Some(frame)) = reader.next().await {
                assert!(frame.len() <= keyhaven::frame::MAX_FRAME_LEN);
            }
        }
        writer.abort();
        assert_eq!(budget.used(), 0, "a dropped reader kept part of the budget");
    });
});
