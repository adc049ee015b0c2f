//! In-memory links between two stacks of one process, for tests, benchmarks and
//! fuzzing: instant, or with a fixed one-way delay (a round trip without a network).

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::Stack;

/// Packets a delayed link holds in flight per direction; the sender waits beyond it.
const DELAYED_PACKETS: usize = 16 * 1024;

/// Moves packets both ways between two stacks in the same process until either is
/// closed: an in-memory link.
pub async fn connect_in_memory(a: Stack, b: Stack) {
    tokio::join!(pump(a.clone(), b.clone()), pump(b, a));
}

/// Like [`connect_in_memory`], but every packet arrives `one_way` after it was sent, in
/// order: a link with a round trip of twice `one_way`.
pub async fn connect_in_memory_delayed(a: Stack, b: Stack, one_way: Duration) {
    tokio::join!(
        delayed_pump(a.clone(), b.clone(), one_way),
        delayed_pump(b, a, one_way)
    );
}

/// Drains `from`'s outbound queue into `to`'s ingress; closes `to` when `from` closes.
async fn pump(from: Stack, to: Stack) {
    let mut batch = Vec::with_capacity(64);
    while from.outbound().drain(&mut batch, 64 * 1024).await > 0 {
        for packet in batch.drain(..) {
            // Drops are counted by the receiving stack.
            let _ = to.ingress(packet);
        }
    }
    to.close();
}

/// [`pump`] through a FIFO of packets stamped with the time they are due.
async fn delayed_pump(from: Stack, to: Stack, one_way: Duration) {
    let (line_in, mut line_out) = mpsc::channel::<(Instant, Bytes)>(DELAYED_PACKETS);
    let send = async move {
        let mut batch = Vec::with_capacity(64);
        while from.outbound().drain(&mut batch, 64 * 1024).await > 0 {
            let due = Instant::now() + one_way;
            for packet in batch.drain(..) {
                if line_in.send((due, packet)).await.is_err() {
                    return;
                }
            }
        }
    };
    let deliver = async {
        while let Some((due, packet)) = line_out.recv().await {
            tokio::time::sleep_until(due).await;
            let _ = to.ingress(packet);
        }
        to.close();
    };
    tokio::join!(send, deliver);
}
