//! Hot reload: watch the config file, and on a change (or SIGHUP) load it, validate it, build the
//! next snapshot and swap it in, all off the request path. The [`Reloader`] is the one writer of
//! the snapshot cell: it also applies DNS discovery's changed answers (see [`crate::discovery`]),
//! one at a time with reloads, so that neither undoes the other.
//!
//! The watch is on the file's directory, not the file: editors that write a new file and rename
//! it over the old one, and Kubernetes ConfigMaps that swap a symlink, both replace the file, and
//! a watch on the old file would go quiet. The directories of the TLS certificate and key files
//! are watched too, so a renewed certificate is picked up without a restart. Events are debounced
//! (a burst settles for 150 ms) and a reload only happens when the config or one of its
//! certificate files really changed; SIGHUP always reloads.
//!
//! Parsing, validation and the snapshot build (a consistent-hash table for 1,000 backends takes
//! about 0.4 s) run on a blocking thread. Requests in flight keep the snapshot they started with;
//! new ones see the new one the moment it is stored. Backend state, coalescing queues and
//! admission limiters with unchanged settings carry over (see [`Snapshot::build`]).
//!
//! A config that does not load keeps the old one serving: the error is logged with its position,
//! counted in `writegate_config_reloads_total{result="failure"}`, and shown by `/status` until a
//! good config loads. Listener, admin and worker changes need a restart and are refused whole,
//! with a message saying so.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::discovery::{self, Update, Watcher};
use crate::snapshot::Snapshot;
use crate::upstream::checks::HealthChecks;

/// Quiet time that ends a burst of file events.
const DEBOUNCE: Duration = Duration::from_millis(150);
/// Longest a burst may delay a reload.
const DEBOUNCE_MAX: Duration = Duration::from_secs(1);

/// What the last reload did, for `/status`.
#[derive(Debug, Clone, Default)]
pub struct ReloadStatus {
    pub last_attempt: Option<SystemTime>,
    pub last_success: Option<SystemTime>,
    /// The error of the last attempt, while the running config is older than the file.
    pub error: Option<String>,
    /// What the last good reload changed.
    pub last_changes: Option<String>,
    pub succeeded: u64,
    pub failed: u64,
}

/// Shared between the reloader and the admin endpoints.
#[derive(Debug, Default)]
pub struct ReloadState {
    status: Mutex<ReloadStatus>,
}

impl ReloadState {
    pub fn status(&self) -> ReloadStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn update(&self, f: impl FnOnce(&mut ReloadStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// What tells the reloader to act: file events and SIGHUP. Opened when reloading is enabled, before
/// the proxy runs, so that no change made after that moment can go unseen.
pub struct Triggers {
    events: mpsc::Receiver<()>,
    _watcher: Option<notify::RecommendedWatcher>,
    hangup: Option<tokio::signal::unix::Signal>,
    /// The config and certificate files when the triggers were opened; events compare against them.
    last_inputs: Option<Vec<u8>>,
}

/// Every file a config reads: itself and its TLS certificates, keys and CAs.
fn input_files(config: &Config) -> Vec<PathBuf> {
    let mut files = vec![config.path.clone()];
    for tls in config.listeners.iter().filter_map(|l| l.tls.as_ref()) {
        files.extend([tls.cert.clone(), tls.key.clone()]);
        files.extend(tls.client_ca.clone());
    }
    files.extend(config.upstreams.iter().filter_map(|u| u.tls_ca.clone()));
    files
}

/// The bytes of every input file, to tell a real change from an unrelated event.
fn read_inputs(files: &[PathBuf]) -> Option<Vec<u8>> {
    let mut all = Vec::new();
    for file in files {
        all.extend(std::fs::read(file).ok()?);
        all.push(0);
    }
    Some(all)
}

impl Triggers {
    /// Must be called inside a tokio runtime (SIGHUP registration needs one).
    pub fn open(config: &Config) -> Triggers {
        let (events_tx, events) = mpsc::channel::<()>(64);
        let files = input_files(config);
        let watcher = watch_directories(&files, events_tx);
        let hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(signal) => Some(signal),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGHUP; reloads come from file changes only");
                None
            }
        };
        Triggers {
            events,
            _watcher: watcher,
            hangup,
            last_inputs: read_inputs(&files),
        }
    }
}

/// Reloads one config file into one snapshot cell, and applies discovery's answers to it.
pub struct Reloader {
    pub path: PathBuf,
    pub snapshots: Arc<ArcSwap<Snapshot>>,
    pub state: Arc<ReloadState>,
    pub checks: HealthChecks,
    /// `None` when reloading is off: the reloader then only applies discovery answers.
    pub triggers: Option<Triggers>,
    pub discovery: DiscoveryWatch,
}

/// The watchers of the discovered upstreams of the snapshot in service, and their answers.
pub struct DiscoveryWatch {
    updates: mpsc::Receiver<Update>,
    sender: mpsc::Sender<Update>,
    /// By upstream name, each with the discovery config it watches.
    watchers: Vec<(Box<str>, crate::config::DiscoveryConfig, Watcher)>,
}

impl Default for DiscoveryWatch {
    fn default() -> DiscoveryWatch {
        let (sender, updates) = mpsc::channel(16);
        DiscoveryWatch {
            updates,
            sender,
            watchers: Vec::new(),
        }
    }
}

impl DiscoveryWatch {
    /// Starts a watcher for each discovered upstream of `snapshot` that has none, and stops those
    /// whose upstream or discovery config is gone.
    fn sync(&mut self, snapshot: &Snapshot) {
        self.watchers.retain(|(name, config, _)| {
            snapshot
                .discovered
                .get(name)
                .is_some_and(|d| d.config == *config)
        });
        for (name, discovered) in &snapshot.discovered {
            if !self.watchers.iter().any(|(n, _, _)| n == name) {
                let watcher = discovery::watch(name, discovered, self.sender.clone());
                self.watchers
                    .push((name.clone(), discovered.config.clone(), watcher));
            }
        }
    }
}

/// What woke the reloader.
enum Event {
    FileChanged,
    Hangup,
    Discovered(Update),
}

impl Reloader {
    /// Watches for changes, SIGHUP and discovery answers until `stop` flips.
    ///
    /// Each version of the files is judged once: `judged` holds the bytes of the last version
    /// tried, refused or not, so that events that change none of them (a log file written in the
    /// same directory) try nothing again. `running` holds the bytes of the config in service: a
    /// file edited back to them clears the error that a refused version left in `/status`.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut running = self.triggers.as_mut().and_then(|t| t.last_inputs.take());
        let mut judged = running.clone();
        self.discovery.sync(&self.snapshots.load());
        loop {
            let (events, hangup) = match &mut self.triggers {
                Some(t) => (Some(&mut t.events), t.hangup.as_mut()),
                None => (None, None),
            };
            let event = tokio::select! {
                _ = stop.changed() => return,
                Some(()) = recv_event(events) => Event::FileChanged,
                Some(()) = recv_signal(hangup) => Event::Hangup,
                Some(update) = self.discovery.updates.recv() => Event::Discovered(update),
            };
            match event {
                Event::Discovered(update) => {
                    self.rediscover(update).await;
                    continue;
                }
                Event::Hangup => tracing::info!("SIGHUP received: reloading the config"),
                Event::FileChanged => {
                    let Some(triggers) = &mut self.triggers else {
                        continue;
                    };
                    settle(&mut triggers.events).await;
                    let files = input_files(&self.snapshots.load().config);
                    let now = tokio::task::spawn_blocking(move || read_inputs(&files))
                        .await
                        .ok()
                        .flatten();
                    if now.is_some() && now == judged {
                        continue; // an event in a watched directory that changed none of our files
                    }
                    judged = now.clone();
                    if now.is_some() && now == running {
                        self.back_to_running();
                        continue;
                    }
                }
            }
            if let Some(inputs) = self.reload().await {
                running = Some(inputs);
                judged = running.clone();
            }
        }
    }

    /// Builds and swaps in the snapshot with one upstream's new discovered set.
    async fn rediscover(&mut self, update: Update) {
        let current = self.snapshots.load_full();
        let built = tokio::task::spawn_blocking(move || current.rediscovered(update)).await;
        if let Ok(Some(next)) = built {
            self.publish(Arc::new(next));
        }
    }

    /// Swaps `snapshot` in and starts what follows it: buffer delivery, the health checks of its
    /// backends, the watchers of its discovery names.
    fn publish(&mut self, snapshot: Arc<Snapshot>) {
        self.snapshots.store(Arc::clone(&snapshot));
        crate::proxy::buffered::ensure_delivery(&self.snapshots);
        self.checks = HealthChecks::start(&snapshot.config.upstreams, &snapshot.upstreams);
        self.discovery.sync(&snapshot);
    }

    /// The files hold the running config again, after a refused edit: nothing to reload, and
    /// no error to show any more.
    fn back_to_running(&self) {
        let had_error = self.state.status().error.is_some();
        if had_error {
            tracing::info!(file = %self.path.display(), "the config file is back to the running config");
            self.state.update(|s| s.error = None);
        }
    }

    /// One reload attempt; the input bytes of the config now in service, when it loaded.
    pub async fn reload(&mut self) -> Option<Vec<u8>> {
        crate::notify::notify("RELOADING=1");
        let applied = self.apply().await;
        crate::notify::notify("READY=1");
        applied
    }

    async fn apply(&mut self) -> Option<Vec<u8>> {
        let path = self.path.clone();
        let previous = self.snapshots.load_full();
        let built = tokio::task::spawn_blocking(move || build(&path, &previous)).await;
        let result = built.unwrap_or_else(|e| Err(format!("the reload task failed: {e}")));
        let now = SystemTime::now();
        match result {
            Ok(Built {
                snapshot,
                changes,
                inputs,
            }) => {
                self.publish(snapshot);
                tracing::info!(file = %self.path.display(), changes = %changes, "config reloaded");
                metrics::counter!(crate::metrics::CONFIG_RELOADS, "result" => "success")
                    .increment(1);
                if let Ok(since_epoch) = now.duration_since(SystemTime::UNIX_EPOCH) {
                    metrics::gauge!(crate::metrics::CONFIG_LAST_RELOAD_SUCCESS)
                        .set(since_epoch.as_secs_f64());
                }
                self.state.update(|s| {
                    s.last_attempt = Some(now);
                    s.last_success = Some(now);
                    s.error = None;
                    s.last_changes = Some(changes);
                    s.succeeded += 1;
                });
                Some(inputs)
            }
            Err(error) => {
                for line in error.lines() {
                    tracing::error!("config reload refused, the running config stays: {line}");
                }
                metrics::counter!(crate::metrics::CONFIG_RELOADS, "result" => "failure")
                    .increment(1);
                self.state.update(|s| {
                    s.last_attempt = Some(now);
                    s.error = Some(error);
                    s.failed += 1;
                });
                None
            }
        }
    }
}

async fn recv_signal(signal: Option<&mut tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

async fn recv_event(events: Option<&mut mpsc::Receiver<()>>) -> Option<()> {
    match events {
        Some(e) => e.recv().await,
        None => std::future::pending().await,
    }
}

/// Waits until file events have been quiet for [`DEBOUNCE`] (at most [`DEBOUNCE_MAX`]).
async fn settle(events: &mut mpsc::Receiver<()>) {
    let deadline = tokio::time::Instant::now() + DEBOUNCE_MAX;
    while let Ok(Some(())) = tokio::time::timeout_at(
        deadline.min(tokio::time::Instant::now() + DEBOUNCE),
        events.recv(),
    )
    .await
    {}
}

/// Watches the directories holding `files` (a replaced file is seen through its directory).
fn watch_directories(
    files: &[PathBuf],
    events: mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut dirs: Vec<PathBuf> = files
        .iter()
        .map(|f| match f.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| may_change_files(&e.kind)) {
            // A full channel already holds a pending reload: dropping this event loses nothing.
            let _ = events.try_send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP");
            return None;
        }
    };
    for dir in dirs {
        if let Err(e) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch a config directory; reload with SIGHUP");
        }
    }
    Some(watcher)
}

/// Whether a file event can have changed a file's bytes. Opening, reading and closing a file
/// unwritten cannot, and must not count: the reloader's own reads of the config would then
/// trigger the next comparison, forever.
fn may_change_files(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Loads, validates and builds the next snapshot; the error text has one problem per line.
///
/// The input files are read *before* parsing, and the config is parsed from exactly those bytes:
/// what is recorded as loaded is never newer than what was loaded, so an edit made during a reload
/// is always seen by the next comparison (at worst causing one reload too many, never one too few).
fn build(path: &Path, previous: &Snapshot) -> Result<Built, String> {
    let mut files = input_files(&previous.config);
    files[0] = path.to_path_buf();
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read config file: {e}", path.display()))?;
    let mut inputs = text.clone().into_bytes();
    inputs.push(0);
    inputs.extend(read_inputs(&files[1..]).unwrap_or_default());
    let config = Config::parse(path, &text).map_err(|errors| errors.to_string())?;
    needs_restart(&previous.config, &config)?;
    let changes = describe_changes(&previous.config, &config);
    let snapshot = Snapshot::build(Arc::new(config), Some(previous));
    Ok(Built {
        snapshot: Arc::new(snapshot),
        changes,
        inputs,
    })
}

/// A config that loaded: its snapshot, what it changes, and the input bytes it came from.
struct Built {
    snapshot: Arc<Snapshot>,
    changes: String,
    inputs: Vec<u8>,
}

/// Refuses changes that only a restart can apply.
fn needs_restart(old: &Config, new: &Config) -> Result<(), String> {
    let file = new.path.display();
    if old.listeners != new.listeners {
        return Err(format!(
            "{file}: [[listeners]] changed; listeners are bound at start, so restart writegate to apply this"
        ));
    }
    if old.admin != new.admin {
        return Err(format!(
            "{file}: [admin] changed; restart writegate to apply this"
        ));
    }
    if old.runtime.workers != new.runtime.workers {
        return Err(format!(
            "{file}: runtime.workers changed; restart writegate to apply this"
        ));
    }
    Ok(())
}

/// One line saying what a reload changes, such as
/// `upstream writers: +127.0.0.1:9004, -127.0.0.1:9002; route kv: changed`.
pub fn describe_changes(old: &Config, new: &Config) -> String {
    let mut changes = Vec::new();
    for u in &new.upstreams {
        let Some(before) = old.upstreams.iter().find(|o| o.name == u.name) else {
            changes.push(format!("upstream {}: added", u.name));
            continue;
        };
        let mut diff: Vec<String> = u
            .backends
            .iter()
            .filter(|b| !before.backends.iter().any(|o| o.label == b.label))
            .map(|b| format!("+{}", b.label))
            .collect();
        diff.extend(
            before
                .backends
                .iter()
                .filter(|o| !u.backends.iter().any(|b| b.label == o.label))
                .map(|o| format!("-{}", o.label)),
        );
        let same_backends = diff.is_empty();
        let settings_changed = {
            let mut a = before.clone();
            a.backends.clone_from(&u.backends);
            a != *u
        };
        if settings_changed || (same_backends && before.backends != u.backends) {
            diff.push("settings changed".to_string());
        }
        if !diff.is_empty() {
            changes.push(format!("upstream {}: {}", u.name, diff.join(", ")));
        }
    }
    for o in &old.upstreams {
        if !new.upstreams.iter().any(|u| u.name == o.name) {
            changes.push(format!("upstream {}: removed", o.name));
        }
    }
    for r in &new.routes {
        match old.routes.iter().find(|o| o.name == r.name) {
            None => changes.push(format!("route {}: added", r.name)),
            Some(o) if route_changed(old, o, new, r) => {
                changes.push(format!("route {}: changed", r.name))
            }
            Some(_) => {}
        }
    }
    for o in &old.routes {
        if !new.routes.iter().any(|r| r.name == o.name) {
            changes.push(format!("route {}: removed", o.name));
        }
    }
    if old.cluster != new.cluster {
        changes.push("cluster changed".to_string());
    }
    if old.log != new.log || old.runtime.shutdown_timeout != new.runtime.shutdown_timeout {
        changes.push("global settings changed".to_string());
    }
    if changes.is_empty() {
        "no changes".to_string()
    } else {
        changes.join("; ")
    }
}

/// Compares routes by meaning: the upstream by name, not by position.
fn route_changed(
    old_config: &Config,
    old: &crate::config::RouteConfig,
    new_config: &Config,
    new: &crate::config::RouteConfig,
) -> bool {
    let upstream_name =
        |c: &Config, r: &crate::config::RouteConfig| c.upstreams[r.upstream].name.clone();
    let mut a = old.clone();
    a.upstream = new.upstream;
    a != *new || upstream_name(old_config, old) != upstream_name(new_config, new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(backends: &str, extra_route: &str) -> Config {
        let text = format!(
            "[[listeners]]\nname = \"l\"\nlisten = \"127.0.0.1:8080\"\n\n[[upstreams]]\nname = \"writers\"\nbackends = [{backends}]\n\n[[routes]]\nname = \"kv\"\nupstream = \"writers\"\n{extra_route}"
        );
        Config::parse(Path::new("w.toml"), &text).unwrap()
    }

    #[test]
    fn changes_are_summarized_in_one_line() {
        let old = config(
            "{ address = \"127.0.0.1:9001\" }, { address = \"127.0.0.1:9002\" }",
            "",
        );
        let new = config(
            "{ address = \"127.0.0.1:9001\" }, { address = \"127.0.0.1:9004\" }",
            "max_body = \"1KiB\"",
        );
        assert_eq!(
            describe_changes(&old, &new),
            "upstream writers: +127.0.0.1:9004, -127.0.0.1:9002; route kv: changed"
        );
        assert_eq!(describe_changes(&old, &old), "no changes");
        let weighted = config(
            "{ address = \"127.0.0.1:9001\", weight = 3 }, { address = \"127.0.0.1:9002\" }",
            "",
        );
        assert_eq!(
            describe_changes(&old, &weighted),
            "upstream writers: settings changed"
        );
    }

    /// Real inotify events: reading the config (as every comparison does) triggers nothing,
    /// writing it does. A marker file created after each step shows when its events are all in.
    #[test]
    fn reading_the_config_is_not_a_change() {
        use notify::Watcher;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.toml");
        std::fs::write(&file, "# v1\n").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut watcher = notify::recommended_watcher(move |event| {
            let _ = tx.send(event);
        })
        .unwrap();
        watcher
            .watch(dir.path(), notify::RecursiveMode::NonRecursive)
            .unwrap();
        let events_until = |marker: &str| {
            std::fs::write(dir.path().join(marker), "").unwrap();
            let mut kinds = Vec::new();
            loop {
                let event: notify::Event = rx
                    .recv_timeout(Duration::from_secs(10))
                    .unwrap_or_else(|_| panic!("no event for {marker} within 10 s: {kinds:?}"))
                    .unwrap();
                if event.paths.iter().any(|p| p.ends_with(marker)) {
                    return kinds;
                }
                kinds.push(event.kind);
            }
        };
        for _ in 0..3 {
            read_inputs(std::slice::from_ref(&file)).unwrap();
        }
        let reads = events_until("read.marker");
        assert!(
            !reads.is_empty(),
            "reading the file raised no events to filter"
        );
        assert!(
            !reads.iter().any(may_change_files),
            "a read counted as a change: {reads:?}"
        );
        std::fs::write(&file, "# v2\n").unwrap();
        let writes = events_until("write.marker");
        assert!(
            writes.iter().any(may_change_files),
            "a write did not count as a change: {writes:?}"
        );
    }

    #[test]
    fn listener_changes_need_a_restart() {
        let old = config("{ address = \"127.0.0.1:9001\" }", "");
        let mut new = old.clone();
        new.listeners[0].listen = "127.0.0.1:8081".parse().unwrap();
        let error = needs_restart(&old, &new).unwrap_err();
        assert!(error.contains("restart writegate to apply this"), "{error}");
    }
}
