//! The four services as separate processes (the built binaries), supervised: SIGKILLed and
//! restarted on demand, and restarted when one exits on its own, as a process supervisor
//! (systemd, Kubernetes) would.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::load::SERVICES;

/// How long a (re)started service may take to answer `/health`, across the starts that
/// fail meanwhile (its process exits before `/health` answers while PostgreSQL, Redis or
/// Kafka restarts).
const HEALTHY_WITHIN: Duration = Duration::from_secs(120);

/// The running services.
pub(crate) struct Services {
    bin_dir: PathBuf,
    log_dir: PathBuf,
    env: Vec<(String, String)>,
    ports: HashMap<&'static str, u16>,
    children: HashMap<&'static str, Child>,
    http: reqwest::Client,
    /// Exits nobody asked for, per service.
    pub(crate) crashes: HashMap<&'static str, usize>,
}

impl Services {
    /// Checks that the four binaries are in `bin_dir`; starts nothing yet.
    pub(crate) fn new(
        bin_dir: &Path,
        log_dir: &Path,
        env: Vec<(String, String)>,
        ports: HashMap<&'static str, u16>,
    ) -> anyhow::Result<Self> {
        for service in SERVICES {
            let binary = bin_dir.join(service);
            if !binary.is_file() {
                bail!(
                    "no {service} binary at {} (build them: cargo build --release -p commerce \
                     --bins, or pass --bin-dir)",
                    binary.display()
                );
            }
        }
        Ok(Self {
            bin_dir: bin_dir.to_owned(),
            log_dir: log_dir.to_owned(),
            env,
            ports,
            children: HashMap::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()?,
            crashes: HashMap::new(),
        })
    }

    /// `http://127.0.0.1:<port>` of `service`.
    pub(crate) fn url(&self, service: &str) -> String {
        format!(
            "http://127.0.0.1:{}",
            self.ports.get(service).copied().unwrap_or(0)
        )
    }

    /// Starts `service` and waits until its `/health` answers, starting it again when it
    /// exits first, for up to [`HEALTHY_WITHIN`]; returns how long that took.
    pub(crate) async fn start(&mut self, service: &'static str) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let deadline = started + HEALTHY_WITHIN;
        let health = format!("{}/health", self.url(service));
        let mut attempts = 0;
        while Instant::now() < deadline {
            attempts += 1;
            let mut child = self.spawn(service)?;
            loop {
                if let Some(status) = child.try_wait()? {
                    tracing::warn!(service, %status, attempts, "exited before it was healthy");
                    break;
                }
                if matches!(self.http.get(&health).send().await, Ok(r) if r.status().is_success()) {
                    self.children.insert(service, child);
                    return Ok(started.elapsed());
                }
                if Instant::now() > deadline {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        bail!(
            "{service} did not answer /health within {HEALTHY_WITHIN:?} ({attempts} starts; see {})",
            self.log_path(service).display()
        )
    }

    fn log_path(&self, service: &str) -> PathBuf {
        self.log_dir.join(format!("{service}.log"))
    }

    fn spawn(&self, service: &'static str) -> anyhow::Result<Child> {
        // One log per service, appended across restarts, for post-mortems.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(service))
            .with_context(|| format!("{}", self.log_path(service).display()))?;
        Command::new(self.bin_dir.join(service))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {service}"))
    }

    /// SIGKILLs `service` (no graceful shutdown) and waits for it to exit.
    pub(crate) async fn kill(&mut self, service: &str) -> anyhow::Result<()> {
        if let Some(mut child) = self.children.remove(service) {
            child.start_kill()?;
            child.wait().await?;
        }
        Ok(())
    }

    /// Restarts every service whose process exited on its own; returns their names.
    pub(crate) async fn revive(&mut self) -> anyhow::Result<Vec<&'static str>> {
        let mut exited = Vec::new();
        for (service, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                tracing::warn!(service, %status, "exited on its own; restarting it");
                exited.push(*service);
            }
        }
        for service in &exited {
            self.children.remove(service);
            *self.crashes.entry(service).or_insert(0) += 1;
            self.start(service).await?;
        }
        Ok(exited)
    }

    /// SIGKILLs every service.
    pub(crate) async fn stop_all(&mut self) {
        for service in SERVICES {
            let _ = self.kill(service).await;
        }
    }
}
