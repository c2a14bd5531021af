//! A worker's CPU priority (`REGCACHE_NICE`, default 10). A cache shares
//! its node's CPUs with the clients it serves, and a miss runs both at
//! once: the client (skopeo, containerd) hashes and writes a layer while
//! the worker receives, hashes and writes the same bytes. The client's
//! work is the pull's pace; each of the fill's wake-ups took a CPU from
//! it. At a lower priority the fill goes into the time the client leaves,
//! as Syncthing's transfers do by default. On an idle CPU nothing changes:
//! priority only orders who waits. The front stays as started: what it
//! answers itself (hits) is the client's wait, not work beside it.
//!
//! Linux keeps a nice value per thread: every thread is set, and the
//! threads started later inherit it. Where the kernel first shares the
//! CPU between sessions (autogroup, outside a CPU cgroup), a nice value
//! orders only its own session, so the worker leaves the supervisor's
//! session for one of its own and sets that too. A worker started by hand
//! as its shell's job leads a process group and cannot; it keeps the
//! shell's session as it is. Priority is only ever lowered.

use std::io;
use std::time::{Duration, Instant};

use rustix::process::{getpid, getpriority_process, getsid, setpriority_process, Pid};

/// The session's share of the CPU, where the kernel groups by session.
const AUTOGROUP: &str = "/proc/self/autogroup";

/// A nice value from 0 (leave the priority as started) to 19.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nice(u8);

impl Nice {
    pub const DEFAULT: Nice = Nice(10);

    pub fn parse(text: &str) -> Option<Nice> {
        text.trim().parse().ok().filter(|n| *n <= 19).map(Nice)
    }

    pub fn get(self) -> i32 {
        self.0.into()
    }
}

/// What [`lower`] changed.
#[derive(Debug, Default)]
pub struct Lowered {
    /// Threads of this process set to the nice value.
    pub threads: usize,
    /// Whether it leads a session of its own, whose autogroup is set
    /// (in the background, by a thread that waits its turn).
    pub session: bool,
}

/// Lowers every thread of this process to `nice`, in a session of its
/// own where it can start one; what already runs lower stays so.
pub fn lower(nice: Nice) -> io::Result<Lowered> {
    let mut done = Lowered::default();
    if nice.0 == 0 {
        return Ok(done);
    }
    // Fails for a process-group leader, which keeps its session.
    let _ = nix::unistd::setsid();
    for entry in std::fs::read_dir("/proc/self/task")? {
        let name = entry?.file_name();
        let Some(tid) = name
            .to_str()
            .and_then(|s| s.parse().ok())
            .and_then(Pid::from_raw)
        else {
            continue;
        };
        // A thread that has ended since the listing is no error.
        match getpriority_process(Some(tid)) {
            Ok(now) if now < nice.get() => {
                setpriority_process(Some(tid), nice.get())?;
                done.threads += 1;
            }
            _ => {}
        }
    }
    if getsid(None).is_ok_and(|sid| sid == getpid()) {
        done.session = true;
        lower_autogroup_soon(nice);
    }
    Ok(done)
}

/// Sets the session's autogroup to `nice` from a thread of its own.
/// Without CAP_SYS_ADMIN the kernel takes one such change per 100 ms from
/// the whole system (EAGAIN), and the workers start together: nine of
/// them need most of a second, so the thread tries until it is its turn
/// (30 s at most) rather than hold the worker's start.
fn lower_autogroup_soon(nice: Nice) {
    let span = tracing::Span::current();
    let tries = move || {
        let _in = span.enter();
        let until = Instant::now() + Duration::from_secs(30);
        // Apart from the others' tries, in the same order every round.
        let pause = Duration::from_millis(100 + u64::from(std::process::id() % 50));
        loop {
            match lower_autogroup(nice) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < until => {
                    std::thread::sleep(pause)
                }
                Err(e) => return tracing::warn!("cannot lower the session's CPU share: {e}"),
                Ok(()) => return,
            }
        }
    };
    let spawned = std::thread::Builder::new()
        .name("nice".into())
        .stack_size(64 << 10)
        .spawn(tries);
    if let Err(e) = spawned {
        tracing::warn!("cannot lower the session's CPU share: {e}");
    }
}

/// Sets the autogroup's nice when the kernel has autogroups and it is
/// lower than `nice`.
fn lower_autogroup(nice: Nice) -> io::Result<()> {
    let Ok(text) = std::fs::read_to_string(AUTOGROUP) else {
        return Ok(());
    };
    if autogroup_nice(&text).is_none_or(|now| now >= nice.get()) {
        return Ok(());
    }
    std::fs::write(AUTOGROUP, nice.get().to_string())
        .map_err(|e| io::Error::new(e.kind(), format!("{AUTOGROUP}: {e}")))
}

/// The nice value in `/proc/PID/autogroup` ("/autogroup-42 nice 0").
pub fn autogroup_nice(text: &str) -> Option<i32> {
    text.split_once(" nice ")?.1.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_values() {
        assert_eq!(Nice::parse("10"), Some(Nice(10)));
        assert_eq!(Nice::parse(" 0 "), Some(Nice(0)));
        assert_eq!(Nice::parse("19"), Some(Nice(19)));
        for bad in ["20", "-5", "ten", "", "1.5"] {
            assert_eq!(Nice::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn autogroup_lines() {
        assert_eq!(autogroup_nice("/autogroup-42 nice 0\n"), Some(0));
        assert_eq!(autogroup_nice("/autogroup-7 nice 10\n"), Some(10));
        assert_eq!(autogroup_nice("/autogroup-7 nice -5\n"), Some(-5));
        assert_eq!(autogroup_nice("garbage"), None);
    }
}
