//! Which relay an agent picks, and what `Agent::connect` + `forward()` costs with one
//! relay against several: `benches/fleet-wan.sh` runs it across a delay line, and it
//! works against any relays that accept the same token.
//!
//! ```sh
//! PORTFERRY_TOKEN=… PORTFERRY_RELAY_CA=cas.pem cargo run --release --example nearest_relay -- \
//!     10 8000 localhost:7836 far.example:7835,localhost:7836
//! ```
//!
//! The arguments: runs per configuration, the local port to forward (nothing needs to
//! listen on it), then each configuration to time, in `PORTFERRY_RELAY` syntax. The
//! runs take the configurations in turn, each after the same pause, so the machine's
//! drift falls on each alike.
//! Prints every run, then per configuration the median, the fastest and the slowest,
//! and the relay chosen; last, the figures of every relay of the last configuration
//! once each has answered (or failed).

use std::time::{Duration, Instant};

use portferry::agent::{Agent, AgentConfig, ProbeOutcome};

type Error = Box<dyn std::error::Error>;

/// The pause before each timed run.
const PAUSE: Duration = Duration::from_millis(200);

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [runs, port, configurations @ ..] = args.as_slice() else {
        return Err("usage: nearest_relay RUNS PORT RELAYS [RELAYS...]".into());
    };
    let (runs, port): (usize, u16) = (runs.parse()?, port.parse()?);
    let base = AgentConfig::from_env()?;
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); configurations.len()];
    let mut chosen: Vec<String> = vec![String::new(); configurations.len()];
    for run in 0..runs {
        for (index, relays) in configurations.iter().enumerate() {
            let mut config = base.clone();
            config.relay = relays.clone();
            // Every run starts from the same rest, whatever ran before it (a run across
            // the line idles the machine for 160 ms, after which it wakes up slower).
            tokio::time::sleep(PAUSE).await;
            let started = Instant::now();
            let agent = Agent::connect(config).await?;
            let tunnel = agent.forward(port).await?;
            let took = started.elapsed();
            println!(
                "run {run:2}  {relays:40}  {:8.2} ms  via {}",
                millis(took),
                agent.relay()
            );
            times[index].push(took);
            chosen[index] = agent.relay().address;
            tunnel.close().await?;
        }
    }
    println!("\nAgent::connect + forward(), {runs} runs each:");
    println!(
        "{:40} {:>10} {:>10} {:>10}  chosen",
        "PORTFERRY_RELAY", "median", "fastest", "slowest"
    );
    for ((relays, times), chosen) in configurations.iter().zip(&mut times).zip(&chosen) {
        times.sort();
        println!(
            "{relays:40} {:8.2} ms {:7.2} ms {:7.2} ms  {chosen}",
            millis(times[times.len() / 2]),
            millis(times[0]),
            millis(times[times.len() - 1]),
        );
    }
    if let Some(relays) = configurations.last() {
        let mut config = base.clone();
        config.relay = relays.clone();
        let agent = Agent::connect(config).await?;
        // The probes of slower relays finish after the choice; give them a few seconds.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline
            && agent
                .relay()
                .candidates
                .iter()
                .any(|c| matches!(c.outcome, ProbeOutcome::Pending))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!("\nprobe figures with {relays}: {}", agent.relay());
    }
    Ok(())
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
