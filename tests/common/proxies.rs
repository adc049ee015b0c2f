//! Real L4 proxies for the tests: nginx (`stream`, `http`) and HAProxy, each started on
//! free loopback ports with a configuration the test writes, everything it touches (the
//! configuration, pid file, logs, nginx's temp paths) inside a temp dir of its own, run
//! in the foreground as one process, and killed when dropped.
//!
//! A test asks for the binary with [`Binary::require`]: in CI (`CI=true`) a missing
//! binary (or nginx without its stream module) fails the test; elsewhere the test is
//! skipped with the reason printed. [`Proxy::start`] writes the configuration (the
//! fixed prelude of [`Binary::render`] followed by the test's body), starts the process
//! and waits, bounded, until every listening port it was given is in the `LISTEN`
//! state (read from `/proc/net/tcp{,6}`, so that no probe connection reaches the
//! proxy's backends). Linux only, as the rest of the end-to-end tests.
//!
//! The bodies are plain nginx/HAProxy configuration text; [`nginx`] and [`haproxy`]
//! render the common pieces (a `stream`/`http` block with its access log, backends).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::time::{sleep, timeout, Instant};

use super::{free_port, Child, TempDir};

/// Which proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// nginx, with its `stream` module (built in, or loaded from the modules path).
    Nginx,
    /// HAProxy.
    Haproxy,
}

impl Kind {
    /// The executable's name.
    pub fn program(self) -> &'static str {
        match self {
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
        }
    }

    /// The Debian packages that provide it.
    pub fn packages(self) -> &'static str {
        match self {
            Kind::Nginx => "nginx libnginx-mod-stream",
            Kind::Haproxy => "haproxy",
        }
    }
}

/// Whether the tests run in CI (`CI=true`), where a missing proxy is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true")
}

/// An installed proxy binary, ready to be started.
#[derive(Clone, Debug)]
pub struct Binary {
    pub kind: Kind,
    pub path: PathBuf,
    /// nginx's stream module to `load_module` (it is not built in), if any.
    stream_module: Option<PathBuf>,
}

impl Binary {
    /// The installed `kind`, or `None` (the reason printed) for the test to skip;
    /// panics instead in CI, where the proxies are installed by `.ci/run`.
    pub fn require(kind: Kind) -> Option<Binary> {
        match Binary::find(kind) {
            Ok(binary) => Some(binary),
            Err(why) if in_ci() => panic!("{why} (CI=true: install {})", kind.packages()),
            Err(why) => {
                eprintln!("skipped: {why} (apt-get install -y {})", kind.packages());
                None
            }
        }
    }

    /// The installed `kind`, or why it cannot be used.
    pub fn find(kind: Kind) -> Result<Binary, String> {
        let path = find_program(kind.program())
            .ok_or_else(|| format!("{} is not installed", kind.program()))?;
        let stream_module = match kind {
            Kind::Nginx => nginx_stream_module(&path)?,
            Kind::Haproxy => None,
        };
        Ok(Binary {
            kind,
            path,
            stream_module,
        })
    }

    /// The whole configuration: the fixed prelude (foreground, one process, pid file
    /// and error log in `setup`'s dir; for HAProxy also `defaults` for TCP with
    /// bounded timeouts and the log on stdout), then `body`.
    pub fn render(&self, setup: &Setup, body: &str) -> String {
        match self.kind {
            Kind::Nginx => {
                let load = self
                    .stream_module
                    .as_ref()
                    .map(|module| format!("load_module {};\n", module.display()))
                    .unwrap_or_default();
                format!(
                    "{load}daemon off;\nmaster_process off;\nworker_processes 1;\n\
                     pid {pid};\nerror_log {error} info;\n\
                     events {{ worker_connections 1024; }}\n\n{body}\n",
                    pid = setup.path("nginx.pid"),
                    error = setup.path(NGINX_ERROR_LOG),
                )
            }
            Kind::Haproxy => format!(
                "global\n  log stdout format raw local0 info\n  pidfile {pid}\n  nbthread 1\n\
                 \ndefaults\n  mode tcp\n  log global\n  option tcplog\n  timeout connect 5s\n\
                 \x20 timeout client 60s\n  timeout server 60s\n\n{body}\n",
                pid = setup.path("haproxy.pid"),
            ),
        }
    }

    /// The configuration file's name in the proxy's dir.
    fn config_name(&self) -> &'static str {
        match self.kind {
            Kind::Nginx => "nginx.conf",
            Kind::Haproxy => "haproxy.cfg",
        }
    }

    /// The command that runs `config` in the foreground with `dir` as its home.
    fn command(&self, dir: &Path, config: &Path) -> Command {
        let mut command = Command::new(&self.path);
        match self.kind {
            Kind::Nginx => {
                // -e: the error log before the configuration is read (not /var/log).
                let prefix = format!("{}/", dir.display());
                command
                    .arg("-p")
                    .arg(prefix)
                    .arg("-e")
                    .arg(dir.join(NGINX_ERROR_LOG))
                    .arg("-c")
                    .arg(config);
            }
            Kind::Haproxy => {
                command.arg("-db").arg("-f").arg(config);
            }
        }
        command
    }
}

/// nginx's error log (in the proxy's dir).
const NGINX_ERROR_LOG: &str = "error.log";

/// The access log the [`nginx`] blocks write (in the proxy's dir).
pub const NGINX_ACCESS_LOG: &str = "access.log";

/// Where the process's stdout and stderr go (HAProxy's log: `log stdout`).
const OUTPUT_LOG: &str = "output.log";

/// `name` in `$PATH` or the usual `sbin` directories (often not in a user's path).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The stream module nginx at `path` must load, from its `-V` configure arguments:
/// none if built in, the `.so` under its modules path if dynamic, an error otherwise.
fn nginx_stream_module(path: &Path) -> Result<Option<PathBuf>, String> {
    let output = Command::new(path)
        .arg("-V")
        .output()
        .map_err(|e| format!("{} -V: {e}", path.display()))?;
    // nginx prints its version and configure arguments on stderr.
    let version = String::from_utf8_lossy(&output.stderr).into_owned();
    let arguments: Vec<&str> = version.split_whitespace().collect();
    if arguments.contains(&"--with-stream") {
        return Ok(None);
    }
    if !arguments.contains(&"--with-stream=dynamic") {
        return Err(format!("{} has no stream module", path.display()));
    }
    let modules = arguments
        .iter()
        .find_map(|argument| argument.strip_prefix("--modules-path="))
        .unwrap_or("/usr/lib/nginx/modules");
    let module = Path::new(modules).join("ngx_stream_module.so");
    if module.is_file() {
        Ok(Some(module))
    } else {
        Err(format!(
            "nginx's stream module {} is missing",
            module.display()
        ))
    }
}

/// What a configuration body is written against: the proxy's dir and the loopback
/// ports it is to listen on.
pub struct Setup {
    dir: PathBuf,
    ports: Vec<u16>,
}

impl Setup {
    /// Listening port `index` (of those asked for in [`Proxy::start`]).
    pub fn port(&self, index: usize) -> u16 {
        self.ports[index]
    }

    /// `127.0.0.1:<port(index)>`.
    pub fn listen(&self, index: usize) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.port(index))
    }

    /// The absolute path of `name` in the proxy's dir, as configuration text.
    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// A running proxy: killed when dropped, its dir (configuration, logs) removed.
pub struct Proxy {
    pub kind: Kind,
    ports: Vec<u16>,
    config: String,
    // Dropped in this order: the process first, then its dir.
    child: Child,
    dir: TempDir,
}

impl Proxy {
    /// Starts `binary` with the configuration [`Binary::render`] makes of `body`,
    /// listening on `listeners` free loopback ports (given to `body` in its [`Setup`]);
    /// returns once all of them listen. Panics, with the proxy's log, if it exits or
    /// does not listen within `limit`; tries other ports (up to three times) when
    /// another process took one meanwhile.
    pub async fn start(
        binary: &Binary,
        listeners: usize,
        limit: Duration,
        body: impl Fn(&Setup) -> String,
    ) -> Proxy {
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            let ports = (0..listeners).map(|_| free_port()).collect();
            match Proxy::launch(binary, ports, limit, &body).await {
                Ok(proxy) => return proxy,
                Err(failed) if failed.port_taken && attempt < ATTEMPTS => continue,
                Err(failed) => panic!("{}", failed.report),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// [`start`](Self::start) on the given `ports` (chosen before, for a configuration
    /// elsewhere that must name them), once.
    pub async fn start_on(
        binary: &Binary,
        ports: &[u16],
        limit: Duration,
        body: impl Fn(&Setup) -> String,
    ) -> Proxy {
        match Proxy::launch(binary, ports.to_vec(), limit, &body).await {
            Ok(proxy) => proxy,
            Err(failed) => panic!("{}", failed.report),
        }
    }

    /// One start on `ports`: the running proxy, or why not.
    async fn launch(
        binary: &Binary,
        ports: Vec<u16>,
        limit: Duration,
        body: &impl Fn(&Setup) -> String,
    ) -> Result<Proxy, Failed> {
        let dir = TempDir::new(binary.kind.program());
        std::fs::create_dir_all(dir.path()).unwrap();
        let setup = Setup {
            dir: dir.path().to_owned(),
            ports,
        };
        let config = binary.render(&setup, &body(&setup));
        let config_path = dir.path().join(binary.config_name());
        std::fs::write(&config_path, &config).unwrap();
        let output = std::fs::File::create(dir.path().join(OUTPUT_LOG)).unwrap();
        let child = binary
            .command(dir.path(), &config_path)
            .stdin(Stdio::null())
            .stdout(output.try_clone().unwrap())
            .stderr(output)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.path.display()));
        let mut proxy = Proxy {
            kind: binary.kind,
            ports: setup.ports,
            config,
            child: Child(child),
            dir,
        };
        match proxy.until_listening(limit).await {
            Ok(()) => Ok(proxy),
            Err(why) => {
                let log = proxy.logs();
                Err(Failed {
                    port_taken: log.contains("Address already in use")
                        || log.contains("cannot bind socket"),
                    report: format!(
                        "{:?} {why}:\n{log}\nconfiguration:\n{}",
                        proxy.kind, proxy.config
                    ),
                })
            }
        }
    }

    /// Waits, at most `limit`, until every port is in the `LISTEN` state while the
    /// process still runs.
    async fn until_listening(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                return Err(format!("exited ({status})"));
            }
            let listening = listening_ports();
            if self.ports.iter().all(|port| listening.contains(port)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "did not listen on {:?} within {limit:?}",
                    self.ports
                ));
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// Listening port `index`.
    pub fn port(&self, index: usize) -> u16 {
        self.ports[index]
    }

    /// `127.0.0.1:<port(index)>`.
    pub fn addr(&self, index: usize) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.port(index))
    }

    /// The configuration it runs.
    pub fn config(&self) -> &str {
        &self.config
    }

    /// The contents of `name` in its dir so far (empty if there is no such file).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// Its access log so far: nginx's [`NGINX_ACCESS_LOG`], HAProxy's `log stdout`.
    pub fn access_log(&self) -> String {
        match self.kind {
            Kind::Nginx => self.log(NGINX_ACCESS_LOG),
            Kind::Haproxy => self.log(OUTPUT_LOG),
        }
    }

    /// Everything it has logged: error log, output, access log.
    pub fn logs(&self) -> String {
        [NGINX_ERROR_LOG, OUTPUT_LOG, NGINX_ACCESS_LOG]
            .iter()
            .map(|name| self.log(name))
            .filter(|text| !text.is_empty())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits, at most `limit`, until its access log holds `lines` lines containing
    /// `needle` (nginx and HAProxy log a TCP session when it ends); the log then.
    pub async fn until_logged(&self, needle: &str, lines: usize, limit: Duration) -> String {
        let waited = timeout(limit, async {
            loop {
                let log = self.access_log();
                if log.lines().filter(|line| line.contains(needle)).count() >= lines {
                    return log;
                }
                sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        waited.unwrap_or_else(|_| {
            panic!(
                "{:?} did not log {lines} line(s) with {needle:?} within {limit:?}:\n{}",
                self.kind,
                self.logs()
            )
        })
    }
}

/// A start that failed.
struct Failed {
    /// Another process had one of the ports.
    port_taken: bool,
    /// What happened, the proxy's log and its configuration.
    report: String,
}

/// The local TCP ports in the `LISTEN` state, IPv4 and IPv6, from `/proc/net`.
fn listening_ports() -> Vec<u16> {
    const LISTEN: &str = "0A";
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state)) = (fields.get(1), fields.get(3)) else {
                continue;
            };
            let port = local
                .rsplit_once(':')
                .and_then(|(_, hex)| u16::from_str_radix(hex, 16).ok());
            if let (Some(port), true) = (port, *state == LISTEN) {
                ports.push(port);
            }
        }
    }
    ports
}

/// Pieces of nginx configuration.
pub mod nginx {
    use super::{Setup, NGINX_ACCESS_LOG};

    /// The `stream` access log's format: client, balancer port, SNI (empty without
    /// `ssl_preread`), upstream, status, bytes each way.
    pub const STREAM_LOG_FORMAT: &str = "$remote_addr:$remote_port $server_port \
        sni=$ssl_preread_server_name upstream=$upstream_addr status=$status \
        sent=$bytes_sent received=$bytes_received";

    /// `stream { … }` with an access log ([`STREAM_LOG_FORMAT`]) in the proxy's dir and
    /// `proxy_half_close on` (a client's FIN is passed on, not taken for the session's
    /// end: portferry's tunnels honour half-close), around `inner` (servers, maps,
    /// upstreams).
    pub fn stream(setup: &Setup, inner: &str) -> String {
        format!(
            "stream {{\n  log_format portferry '{STREAM_LOG_FORMAT}';\n  \
             access_log {} portferry;\n  proxy_half_close on;\n{inner}\n}}\n",
            setup.path(NGINX_ACCESS_LOG)
        )
    }

    /// `http { … }` with its access log and temp paths in the proxy's dir (not the
    /// distribution's `/var/lib/nginx`), around `inner` (servers).
    pub fn http(setup: &Setup, inner: &str) -> String {
        let temp: String = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
            .iter()
            .map(|kind| {
                format!(
                    "  {kind}_temp_path {};\n",
                    setup.path(&format!("{kind}_temp"))
                )
            })
            .collect();
        format!(
            "http {{\n{temp}  access_log {};\n{inner}\n}}\n",
            setup.path(NGINX_ACCESS_LOG)
        )
    }
}

/// Pieces of HAProxy configuration.
pub mod haproxy {
    use std::net::SocketAddr;

    /// `backend <name>` with one server at `addr`; `options` follow the server's
    /// address (e.g. `send-proxy-v2`).
    pub fn backend(name: &str, addr: SocketAddr, options: &str) -> String {
        format!("backend {name}\n  server {name} {addr} {options}\n")
    }
}
