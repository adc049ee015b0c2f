//! Tunnel leases on a real relay: bounded per token and per relay. (Saving them where
//! the README's production command keeps them is in `tests/restart.rs`.)

mod common;

use std::time::Duration;

use common::{eventually, Fixture};

use portferry::Error;

const STEP: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_bounded_per_token_refused_with_a_code_and_counted() {
    let fx = Fixture::start_with(STEP, |config| {
        config.max_leases_per_token = 3;
    })
    .await;
    let (first, second) = (fx.agent().await, fx.agent().await);
    let _a = first.forward(1001).await.unwrap();
    let _b = first.forward(1002).await.unwrap();
    let _c = second.forward(1001).await.unwrap();
    let refused = second.forward(1002).await.unwrap_err();
    assert!(
        matches!(&refused, Error::LimitReached { message } if message.contains("max_leases_per_token")),
        "{refused:?}"
    );
    let stats = fx.stats();
    assert_eq!(
        (stats.leases, stats.tunnels, stats.refused_by_limit),
        (3, 3, 1)
    );
    // A lease given up makes room.
    drop(_a);
    eventually(STEP, "the closed tunnel's lease to end", || async {
        fx.stats().leases == 2
    })
    .await;
    second.forward(1002).await.unwrap();
}
