//! Client connections on one single-threaded runtime per core, as nginx's
//! worker processes: each thread polls only its own sockets, so a request is
//! read, answered and written by one thread with no hand-over between
//! threads (a work-stealing runtime's wake-ups cost more than a manifest
//! hit's own work). The accept loop and everything else stay on the main
//! runtime.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;

use crate::log_lines;
use tokio::sync::oneshot;

/// The connection runtimes; dropping it stops them (and what still runs
/// on them) and joins their threads.
pub struct Cores {
    cores: Vec<Core>,
    next: AtomicUsize,
}

struct Core {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Cores {
    /// One runtime per available core. Each thread gathers its log lines
    /// and writes them before it sleeps (see [`log_lines`]).
    pub fn start() -> std::io::Result<Cores> {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut cores = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(log_lines::flush)
                .build()?;
            let handle = rt.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("regcache-conn-{i}"))
                .spawn(move || {
                    log_lines::gather();
                    let _ = rt.block_on(stopped);
                    // A file read still running must not hold the stop up.
                    rt.shutdown_timeout(Duration::from_secs(1));
                    log_lines::flush();
                })?;
            cores.push(Core {
                handle,
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(Cores {
            cores,
            next: AtomicUsize::new(0),
        })
    }

    /// Runs `task` on the next core, round robin.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.cores.len();
        self.cores[i].handle.spawn(task);
    }
}

impl Drop for Cores {
    fn drop(&mut self) {
        for c in &mut self.cores {
            if let Some(stop) = c.stop.take() {
                let _ = stop.send(());
            }
        }
        for c in &mut self.cores {
            if let Some(t) = c.thread.take() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_the_core_threads_round_robin_and_stop_with_them() {
        let cores = Cores::start().unwrap();
        let n = cores.cores.len();
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..2 * n {
            let tx = tx.clone();
            cores.spawn(async move {
                let name = std::thread::current().name().unwrap_or("").to_string();
                tx.send(name).unwrap();
            });
        }
        let mut names: Vec<String> = (0..2 * n).map(|_| rx.recv().unwrap()).collect();
        names.sort();
        let mut want: Vec<String> = (0..n)
            .flat_map(|i| [format!("regcache-conn-{i}"), format!("regcache-conn-{i}")])
            .collect();
        want.sort();
        assert_eq!(names, want);
        // A task still pending when the cores stop is dropped, not leaked.
        let (held, dropped) = oneshot::channel::<()>();
        cores.spawn(async move {
            let _held = held;
            std::future::pending::<()>().await
        });
        drop(cores);
        assert!(
            dropped.blocking_recv().is_err(),
            "the pending task was dropped"
        );
    }
}
