//! Child processes that cannot outlive the test process.
//!
//! Every child gets `PR_SET_PDEATHSIG`. That signal fires when the *thread* that forked the child
//! exits, not the process: a child forked from a test thread or a tokio worker would be killed as
//! soon as that thread finished. So all children are forked by one dedicated spawner thread that
//! lives until the process exits; when the test binary exits (normally, by panic, by Ctrl-C or by
//! SIGKILL), the kernel signals every child.
//!
//! Each child also leads its own process group, so [`Proc::kill`] takes its helpers (for example
//! a `helm` run by the coordinator) down with it.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::sync::watch;

type SpawnJob = (Command, mpsc::Sender<io::Result<Child>>);

/// Forks `cmd` from the long-lived spawner thread, with `signal` as its parent-death signal.
pub(crate) fn spawn_tied(mut cmd: Command, signal: libc::c_int) -> io::Result<Child> {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nobody will signal us.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    cmd.process_group(0);

    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("klm-testkit-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start the spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("spawner thread is gone"))?
}

/// A running child process with its stdout and stderr captured in one log file.
///
/// Dropping a `Proc` SIGKILLs its process group; if the test is panicking at that moment, the
/// captured log is printed first, so a failing test shows what the product binaries said.
pub struct Proc {
    name: String,
    pid: libc::pid_t,
    log_path: PathBuf,
    exited: watch::Receiver<Option<ExitStatus>>,
    /// True while the process is stopped (SIGSTOP), as its parent's waitpid reports it.
    stopped: watch::Receiver<bool>,
}

impl Proc {
    /// Starts `program` with `args` and `envs` (added to the test's environment), logging to `log_path`.
    pub(crate) fn start<I, S>(
        name: &str,
        program: &Path,
        args: I,
        envs: &[(String, String)],
        log_path: PathBuf,
    ) -> Result<Proc>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        if let Some(dir) = log_path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let log = File::create(&log_path)
            .with_context(|| format!("create log file {}", log_path.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = spawn_tied(cmd, libc::SIGKILL)
            .with_context(|| format!("start {}", program.display()))?;
        Ok(Proc::watch(name, child, log_path))
    }

    /// Wraps an already started child: a thread reaps it and publishes its exit status, and
    /// whether it is stopped (waitpid with WUNTRACED|WCONTINUED: the parent is told of stops and
    /// continues, so [`Proc::pause`] can wait for the stop instead of polling /proc).
    pub(crate) fn watch(name: &str, child: Child, log_path: PathBuf) -> Proc {
        let pid = child.id() as libc::pid_t;
        // Reaped below with waitpid; std's Child is not waited on (dropping it does nothing).
        drop(child);
        let (tx, rx) = watch::channel(None);
        let (stopped_tx, stopped_rx) = watch::channel(false);
        std::thread::Builder::new()
            .name(format!("wait-{name}"))
            .spawn(move || {
                loop {
                    let mut raw: libc::c_int = 0;
                    // SAFETY: waitpid on our own child, writing into a local.
                    let r =
                        unsafe { libc::waitpid(pid, &mut raw, libc::WUNTRACED | libc::WCONTINUED) };
                    if r == -1 {
                        if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                            continue;
                        }
                        let _ = tx.send(Some(ExitStatus::from_raw(-1)));
                        return;
                    }
                    if libc::WIFSTOPPED(raw) {
                        let _ = stopped_tx.send(true);
                    } else if libc::WIFCONTINUED(raw) {
                        let _ = stopped_tx.send(false);
                    } else {
                        let _ = stopped_tx.send(false);
                        let _ = tx.send(Some(ExitStatus::from_raw(raw)));
                        return;
                    }
                }
            })
            .expect("start a waiter thread");
        Proc {
            name: name.to_owned(),
            pid,
            log_path,
            exited: rx,
            stopped: stopped_rx,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The exit status, if the process has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.exited.borrow()
    }

    /// SIGKILL (the whole process group): a crash, as far as the product can tell.
    pub fn kill(&self) {
        self.signal(libc::SIGKILL);
    }

    /// SIGSTOP (the whole process group), and waits until the process is stopped: it freezes
    /// wherever it is, as under a VM pause, a stalled disk or a long stop-the-world pause; its
    /// connections stay open and its timers stop. [`Proc::resume`] continues it; dropping the
    /// `Proc` still kills it.
    pub async fn pause(&self) -> Result<()> {
        self.signal(libc::SIGSTOP);
        self.wait_stopped(true).await
    }

    /// SIGCONT (the whole process group), and waits until the process runs again.
    pub async fn resume(&self) -> Result<()> {
        self.signal(libc::SIGCONT);
        self.wait_stopped(false).await
    }

    /// Whether the process is stopped (SIGSTOP) right now.
    pub fn is_paused(&self) -> bool {
        *self.stopped.borrow()
    }

    async fn wait_stopped(&self, stopped: bool) -> Result<()> {
        let mut rx = self.stopped.clone();
        let timeout = Duration::from_secs(10);
        match tokio::time::timeout(timeout, rx.wait_for(|s| *s == stopped)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => bail!("{}: waiter thread vanished", self.name),
            Err(_) => bail!(
                "{} not {} after {timeout:?}",
                self.name,
                if stopped { "stopped" } else { "continued" }
            ),
        }
    }

    /// SIGTERM to the process: a graceful shutdown request, as Kubernetes sends on pod deletion.
    pub fn terminate(&self) {
        if self.exit_status().is_none() {
            // SAFETY: plain kill(2); the pid is ours and not yet reaped (checked just above).
            unsafe { libc::kill(self.pid, libc::SIGTERM) };
        }
    }

    fn signal(&self, sig: libc::c_int) {
        if self.exit_status().is_none() {
            // SAFETY: plain kill(2) on the child's own process group (it called setpgid(0, 0)).
            unsafe { libc::kill(-self.pid, sig) };
        }
    }

    /// Waits until the process exits, at most `timeout`.
    pub async fn wait(&self, timeout: Duration) -> Result<ExitStatus> {
        let mut rx = self.exited.clone();
        match tokio::time::timeout(timeout, rx.wait_for(Option::is_some)).await {
            Ok(Ok(status)) => Ok(status.expect("checked by wait_for")),
            Ok(Err(_)) => bail!("{}: waiter thread vanished", self.name),
            Err(_) => bail!("{} still running after {timeout:?}", self.name),
        }
    }

    pub(crate) fn print_logs(&self) {
        let status = match self.exit_status() {
            Some(s) => s.to_string(),
            None => "running".to_owned(),
        };
        eprintln!(
            "----- {} (pid {}, {status}) log {} -----\n{}\n----- end of {} -----",
            self.name,
            self.pid,
            self.log_path.display(),
            self.logs(),
            self.name
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        self.signal(libc::SIGKILL);
    }
}
