//! The loop that runs reconciles: what asks for one (a watched change, a namespace's labels, a
//! newly held shard) goes into the [`Queue`]; at most `slots` reconciles work at once, each on
//! the object as the cache holds it when its turn comes; what a reconcile returns (or the
//! error policy, when it fails) says when the object is due again.

use std::{collections::HashMap, pin::pin};

use futures::{
    Stream, StreamExt,
    future::BoxFuture,
    stream::{BoxStream, FusedStream},
};
use kube::runtime::reflector::ObjectRef;
use tokio::{task::JoinSet, time::Instant};

use super::{queue::Queue, *};

type Guard = DeserializeGuard<RdpHealth>;
type Key = ObjectRef<Guard>;

/// What can ask for reconciles.
pub(super) enum Trigger {
    /// An object changed (as the watch saw it).
    Changed(Box<Guard>),
    /// One object (something it depends on changed).
    One(Key),
    /// Every object in the cache (a shard was newly taken over).
    All,
}

/// The triggers of one controller, merged.
pub(super) type Triggers = BoxStream<'static, Trigger>;

/// What the runner runs: reconciles, and where an object queues.
pub(super) trait Work: Send + Sync + 'static {
    /// Reconciles `guard`'s object; when it is due again without a change.
    fn reconcile(&self, guard: Arc<Guard>) -> BoxFuture<'static, Option<Duration>>;
    /// How long ago the object's work fell due (it queues that far back).
    fn overdue(&self, guard: &Guard) -> Duration;
    /// A reconcile of `key` panicked: when to try again.
    fn panicked(&self, key: &Key, e: &tokio::task::JoinError) -> Duration;
    /// A reconcile started `waited` after it fell due.
    fn waited(&self, waited: Duration);
}

/// What one reconcile ends with, as the queue needs it.
struct Ended {
    key: Arc<Key>,
    next: Option<Duration>,
}

/// Runs reconciles until `shutdown` resolves, then lets the ones at work finish (those still
/// waiting do not start). Nothing starts before the cache holds its first complete list.
pub(super) async fn run<W: Work>(
    store: Store<Guard>,
    triggers: Triggers,
    work: Arc<W>,
    slots: usize,
    shutdown: impl Future<Output = ()>,
) {
    let slots = slots.max(1);
    let mut queue: Queue<Key> = Queue::default();
    let mut working: JoinSet<Ended> = JoinSet::new();
    // Which object each task works on, for a task that panicked.
    let mut tasks: HashMap<tokio::task::Id, Arc<Key>> = HashMap::new();
    let mut triggers = triggers.fuse();
    let mut shutdown = pin!(shutdown);
    let ready_store = store.clone();
    let mut ready_wait = pin!(async move { ready_store.wait_until_ready().await.is_ok() });
    let mut ready = false;
    let mut awaiting_ready = true;
    let mut stopping = false;
    loop {
        if ready && !stopping {
            let now = Instant::now();
            while queue.working() < slots {
                let Some((key, due)) = queue.pop(now) else {
                    break;
                };
                // Gone from the cache since it was asked for: nothing to do.
                let Some(guard) = store.get(&key) else {
                    queue.done(&key, None);
                    continue;
                };
                work.waited(now.saturating_duration_since(due));
                let reconcile = work.reconcile(guard);
                let task_key = Arc::clone(&key);
                let handle = working.spawn(async move {
                    Ended {
                        key: task_key,
                        next: reconcile.await,
                    }
                });
                tasks.insert(handle.id(), key);
            }
        }
        if stopping && working.is_empty() {
            return;
        }
        let wake = (ready && !stopping && queue.working() < slots)
            .then(|| queue.next_due())
            .flatten();
        tokio::select! {
            biased;
            Some(ended) = working.join_next_with_id(), if !working.is_empty() => {
                let now = Instant::now();
                match ended {
                    Ok((id, ended)) => {
                        tasks.remove(&id);
                        queue.done(&ended.key, ended.next.map(|d| now + d));
                    }
                    Err(e) => {
                        let Some(key) = tasks.remove(&e.id()) else { continue };
                        let delay = work.panicked(&key, &e);
                        queue.done(&key, Some(now + delay));
                    }
                }
            }
            () = &mut shutdown, if !stopping => {
                stopping = true;
                info!(working = working.len(), "stopping: letting the reconciles at work finish");
            }
            trigger = triggers.next(), if !triggers.is_terminated() => match trigger {
                Some(Trigger::Changed(guard)) => {
                    let overdue = work.overdue(&guard);
                    ask(&mut queue, ObjectRef::from_obj(&*guard), overdue);
                }
                Some(Trigger::One(key)) => {
                    let overdue = store.get(&key).map_or(Duration::ZERO, |g| work.overdue(&g));
                    ask(&mut queue, key, overdue);
                }
                Some(Trigger::All) => {
                    for guard in store.state() {
                        let overdue = work.overdue(&guard);
                        ask(&mut queue, ObjectRef::from_obj(&*guard), overdue);
                    }
                }
                // The watch ended (it does not on its own): only the shutdown ends the loop.
                None => warn!("the watch of RdpHealth objects ended"),
            },
            ok = &mut ready_wait, if awaiting_ready => {
                awaiting_ready = false;
                ready = ok;
                if !ok {
                    warn!("the object cache was dropped: no reconcile can run");
                }
            }
            () = sleep_until(wake), if wake.is_some() => {}
        }
    }
}

/// The controller's reconciles, with its context.
pub(super) struct Reconciles(pub(super) Arc<Context>);

impl Work for Reconciles {
    fn reconcile(&self, guard: Arc<Guard>) -> BoxFuture<'static, Option<Duration>> {
        let ctx = Arc::clone(&self.0);
        Box::pin(async move {
            match reconcile(Arc::clone(&guard), Arc::clone(&ctx)).await {
                Ok(action) => action.requeue_after(),
                Err(e) => error_policy(guard, &e, ctx).requeue_after(),
            }
        })
    }

    fn overdue(&self, guard: &Guard) -> Duration {
        reconcile::overdue(&self.0, guard)
    }

    fn waited(&self, waited: Duration) {
        self.0.metrics.reconcile_waited(waited);
    }

    /// Tried again after the backoff of a failure.
    fn panicked(&self, key: &Key, e: &tokio::task::JoinError) -> Duration {
        let ctx = &self.0;
        let attempt = ctx.failed_again(ObjectKey {
            namespace: key.namespace.clone().unwrap_or_default(),
            name: key.name.clone(),
        });
        let delay = backoff_delay(attempt);
        ctx.metrics.reconcile_failed("Panicked");
        warn!(namespace = ?key.namespace, name = %key.name, error = %e, attempt, retry_ms = delay.as_millis() as u64, "reconcile panicked");
        delay
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Queues `key`: now, or `overdue` ago when its work fell due before now (after a restart,
/// the objects probed longest ago go first).
fn ask(queue: &mut Queue<Key>, key: Key, overdue: Duration) {
    let now = Instant::now();
    queue.schedule(key, now.checked_sub(overdue).unwrap_or(now));
}

/// The applied objects of the controller's watch as triggers (a watch error is logged: the
/// watch retries on its own).
pub(super) fn changes<S>(applied: S) -> Triggers
where
    S: Stream<Item = Result<Guard, watcher::Error>> + Send + 'static,
{
    applied
        .filter_map(|event| async move {
            match event {
                Ok(guard) => Some(Trigger::Changed(Box::new(guard))),
                Err(e) => {
                    debug!(error = %e, "watch error");
                    None
                }
            }
        })
        .boxed()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use futures::channel::mpsc;
    use kube::runtime::reflector::store::Writer;
    use tokio::sync::Notify;

    use super::*;

    /// Work that records what ran, in what order and how much at once; an object's work can be
    /// held until released, can panic once, and asks to run again after `again`.
    #[derive(Default)]
    struct Recorder {
        ran: Mutex<Vec<String>>,
        running: Mutex<(usize, usize)>,
        held: Mutex<HashMap<String, Arc<Notify>>>,
        overdue: HashMap<String, Duration>,
        panic_once: Mutex<HashSet<String>>,
        again: Option<Duration>,
        panics: Mutex<Vec<String>>,
        waits: Mutex<Vec<Duration>>,
    }

    impl Recorder {
        fn ran(&self) -> Vec<String> {
            self.ran.lock().unwrap().clone()
        }

        fn most_at_once(&self) -> usize {
            self.running.lock().unwrap().1
        }

        /// Holds `name`'s work until the returned notify is notified.
        fn hold(&self, name: &str) -> Arc<Notify> {
            let gate = Arc::new(Notify::new());
            self.held
                .lock()
                .unwrap()
                .insert(name.to_owned(), Arc::clone(&gate));
            gate
        }
    }

    struct Running(Arc<Recorder>);

    impl Drop for Running {
        fn drop(&mut self) {
            self.0.running.lock().unwrap().0 -= 1;
        }
    }

    /// The recorder as the runner's work.
    struct Shared(Arc<Recorder>);

    impl Work for Shared {
        fn reconcile(&self, guard: Arc<Guard>) -> BoxFuture<'static, Option<Duration>> {
            let name = meta_of(&guard).name.clone().unwrap_or_default();
            let me = Arc::clone(&self.0);
            Box::pin(async move {
                {
                    let mut running = me.running.lock().unwrap();
                    running.0 += 1;
                    running.1 = running.1.max(running.0);
                }
                let _running = Running(Arc::clone(&me));
                me.ran.lock().unwrap().push(name.clone());
                let gate = me.held.lock().unwrap().remove(&name);
                if let Some(gate) = gate {
                    gate.notified().await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                if me.panic_once.lock().unwrap().remove(&name) {
                    panic!("reconcile of {name} panicked");
                }
                me.again
            })
        }

        fn overdue(&self, guard: &Guard) -> Duration {
            let name = meta_of(guard).name.as_deref().unwrap_or_default();
            self.0.overdue.get(name).copied().unwrap_or_default()
        }

        fn panicked(&self, key: &Key, _: &tokio::task::JoinError) -> Duration {
            self.0.panics.lock().unwrap().push(key.name.clone());
            Duration::from_secs(5)
        }

        fn waited(&self, waited: Duration) {
            self.0.waits.lock().unwrap().push(waited);
        }
    }

    fn object(name: &str) -> Guard {
        DeserializeGuard(Ok(serde_json::from_value(json!({
            "apiVersion": "rdphealth.io/v1alpha1", "kind": "RdpHealth",
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}")},
            "spec": {"vm": {"resourceId": "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm"}},
        }))
        .unwrap()))
    }

    struct Harness {
        writer: Writer<Guard>,
        triggers: mpsc::UnboundedSender<Trigger>,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Harness {
        /// The runner over `names` (in the cache, and announced by the watch), `slots` at once;
        /// the cache is ready at once when `ready`.
        fn start(recorder: &Arc<Recorder>, names: &[&str], slots: usize, ready: bool) -> Self {
            let mut writer = Writer::<Guard>::default();
            let store = writer.as_reader();
            let (tx, rx) = mpsc::unbounded();
            writer.apply_watcher_event(&watcher::Event::Init);
            for name in names {
                writer.apply_watcher_event(&watcher::Event::InitApply(object(name)));
                tx.unbounded_send(Trigger::Changed(Box::new(object(name))))
                    .unwrap();
            }
            if ready {
                writer.apply_watcher_event(&watcher::Event::InitDone);
            }
            let (stop, stopped) = tokio::sync::oneshot::channel();
            let task = tokio::spawn(run(
                store,
                rx.boxed(),
                Arc::new(Shared(Arc::clone(recorder))),
                slots,
                async move {
                    let _ = stopped.await;
                },
            ));
            Self {
                writer,
                triggers: tx,
                stop: Some(stop),
                task,
            }
        }

        fn change(&self, name: &str) {
            self.triggers
                .unbounded_send(Trigger::Changed(Box::new(object(name))))
                .unwrap();
        }

        async fn stop(mut self) {
            let _ = self.stop.take().unwrap().send(());
            tokio::time::timeout(Duration::from_secs(60), self.task)
                .await
                .expect("the runner stops once its work is done")
                .unwrap();
        }
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_secs(10)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_object_due_first_goes_first_and_never_more_than_the_slots_at_once() {
        let overdue = [
            ("a", 0),
            ("b", 40),
            ("c", 10),
            ("d", 30),
            ("e", 20),
            ("f", 0),
        ];
        let recorder = Arc::new(Recorder {
            overdue: overdue
                .iter()
                .map(|(n, s)| ((*n).to_owned(), Duration::from_secs(*s)))
                .collect(),
            ..Recorder::default()
        });
        let h = Harness::start(&recorder, &["a", "b", "c", "d", "e", "f"], 2, true);
        settle().await;
        assert_eq!(recorder.ran(), ["b", "d", "e", "c", "a", "f"]);
        assert_eq!(recorder.most_at_once(), 2);
        // Each waited from when it fell due: b and d at once, 40 and 30 s overdue; e and c
        // after one 100 ms round; a and f after two.
        let ms = |d: &Duration| d.as_millis();
        let waits: Vec<u128> = recorder.waits.lock().unwrap().iter().map(ms).collect();
        assert_eq!(
            waits,
            [40_000, 30_000, 20_100, 10_100, 200, 200],
            "{waits:?}"
        );
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_runs_before_the_cache_holds_its_first_list() {
        let recorder = Arc::new(Recorder::default());
        let mut h = Harness::start(&recorder, &["a", "b"], 2, false);
        settle().await;
        assert!(recorder.ran().is_empty(), "{:?}", recorder.ran());
        h.writer.apply_watcher_event(&watcher::Event::InitDone);
        settle().await;
        assert_eq!(recorder.ran(), ["a", "b"]);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_object_deleted_while_it_waits_is_not_reconciled() {
        let recorder = Arc::new(Recorder::default());
        let gate = recorder.hold("a");
        let mut h = Harness::start(&recorder, &["a", "b"], 1, true);
        settle().await;
        assert_eq!(recorder.ran(), ["a"], "b waits for the only slot");
        h.writer
            .apply_watcher_event(&watcher::Event::Delete(object("b")));
        gate.notify_one();
        settle().await;
        assert_eq!(recorder.ran(), ["a"], "the deleted object was reconciled");
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn changes_during_a_reconcile_run_it_once_more_afterwards_never_alongside() {
        let recorder = Arc::new(Recorder::default());
        let gate = recorder.hold("a");
        let h = Harness::start(&recorder, &["a"], 4, true);
        settle().await;
        for _ in 0..3 {
            h.change("a");
        }
        settle().await;
        assert_eq!(
            recorder.ran(),
            ["a"],
            "a second reconcile of a ran alongside"
        );
        gate.notify_one();
        settle().await;
        assert_eq!(recorder.ran(), ["a", "a"]);
        assert_eq!(recorder.most_at_once(), 1);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_object_is_reconciled_again_when_it_asked() {
        let recorder = Arc::new(Recorder {
            again: Some(Duration::from_secs(30)),
            ..Recorder::default()
        });
        let h = Harness::start(&recorder, &["a"], 1, true);
        // At about 0, 30, 60 and 90 s.
        tokio::time::sleep(Duration::from_secs(95)).await;
        assert_eq!(recorder.ran().len(), 4, "{:?}", recorder.ran());
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_lets_the_work_finish_and_starts_no_more() {
        let recorder = Arc::new(Recorder::default());
        let gate = recorder.hold("a");
        let h = Harness::start(&recorder, &["a", "b"], 1, true);
        settle().await;
        let stopped = tokio::spawn(h.stop());
        settle().await;
        assert!(
            !stopped.is_finished(),
            "stopped while a reconcile was at work"
        );
        gate.notify_one();
        stopped.await.unwrap();
        assert_eq!(
            recorder.ran(),
            ["a"],
            "a waiting reconcile started while stopping"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconcile_that_panicked_is_tried_again_after_its_backoff() {
        let recorder = Arc::new(Recorder::default());
        recorder.panic_once.lock().unwrap().insert("a".into());
        let h = Harness::start(&recorder, &["a", "b"], 1, true);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(recorder.ran(), ["a", "b"], "b waited behind the panic");
        assert_eq!(*recorder.panics.lock().unwrap(), ["a"]);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(recorder.ran(), ["a", "b", "a"]);
        h.stop().await;
    }
}
