//! The `portferry` command: `relay`, `forward` and `demo`. Thin: parses flags, sets up
//! logging, and calls the library.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use portferry::agent::{Agent, AgentConfig};
use portferry::relay::{Relay, RelayConfig};
use portferry::token::Token;

use cli::args::{Cli, Command, StateArgs};
use cli::forward::{describe, forward};
use cli::relay::relay;
use cli::signals::ShutdownSignals;

mod cli;
mod os;

#[tokio::main]
async fn main() -> ExitCode {
    os::return_big_buffers_to_the_os();
    let cli = Cli::parse();
    let default_level = ["info", "debug", "trace"][usize::from(cli.verbose.min(2))];
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Command::Relay(args) => relay(*args).await,
        Command::Forward(args) => forward(args).await,
        Command::Demo(args) => demo(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{}", report(&error));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes, for people: no backtrace (that is for `RUST_LOG` and
/// debuggers), and a cause whose text the line above already includes is not repeated.
fn report(error: &anyhow::Error) -> String {
    let mut text = format!("error: {error}");
    let mut above = error.to_string();
    for cause in error.chain().skip(1).map(ToString::to_string) {
        if !above.contains(&cause) {
            text += &format!("\n  caused by: {cause}");
        }
        above = cause;
    }
    text
}

/// The state directory: the flag, else `$XDG_STATE_HOME/portferry`, else
/// `~/.local/state/portferry`, else `./.portferry`.
pub(crate) fn state_dir(args: &StateArgs) -> PathBuf {
    if let Some(dir) = &args.state_dir {
        return dir.clone();
    }
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".local/state")));
    base.map_or_else(
        || PathBuf::from(".portferry"),
        |base| base.join("portferry"),
    )
}
/// Writes to stdout in one go. A reader that has gone away (`portferry relay | head`)
/// is no reason to stop serving, so write errors are ignored instead of panicking as
/// `println!` does.
pub(crate) fn say(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = std::io::Write::write_all(&mut stdout, text.as_bytes());
    let _ = std::io::Write::flush(&mut stdout);
}

async fn demo(args: StateArgs) -> Result<()> {
    let mut signals = ShutdownSignals::new()?;
    let state = state_dir(&args);
    let pki = portferry::tls::local_pki(&state, portferry::relay::LOCAL_DOMAIN)?;
    let token = Token::generate();
    let relay = Relay::bind(RelayConfig::local(pki.identity, vec![token.clone()], 0, 0)).await?;
    let mut agent_config =
        AgentConfig::new(format!("localhost:{}", relay.agent_addr().port()), token);
    agent_config.relay_ca = Some(pki.ca_cert_path.clone());
    tokio::spawn(relay.run());

    let service = portferry::demo::start_hello_service().await?;
    let agent = Agent::connect(agent_config).await?;
    let tunnel = agent.forward(service.port()).await?;
    say(&format!(
        "a relay, an agent and a sample HTTP service (on {service}) are running.\n{}\n\
         try it from another terminal:\n  curl --cacert {} {}/\n\nCtrl-C to stop\n",
        describe(&tunnel.address()),
        pki.ca_cert_path.display(),
        tunnel.url()
    ));
    signals.next().await;
    signals.closing(tunnel.close()).await;
    Ok(())
}
