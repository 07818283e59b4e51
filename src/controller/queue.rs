//! Which object's reconcile runs next: one entry per object in a heap keyed by when it is due,
//! the earliest first. Waiting costs an entry, never a parked future, so 100,000 objects due
//! at once cost 100,000 small entries and O(log n) per step.
//!
//! kube-runtime's own queue, once its reconcilers were busy, handed out waiting objects in
//! hash order, so under load some objects waited indefinitely while others were probed again
//! and again; this queue serves them in the order they fell due.

use std::{
    cmp::Ordering as CmpOrdering,
    collections::{BinaryHeap, HashMap},
    hash::Hash,
    sync::Arc,
};

use tokio::time::Instant;

/// The queue of one controller. Keys are objects; an object is in at most one of three
/// states: waiting (due at some time), working, or neither (not in the queue).
#[derive(Debug)]
pub(super) struct Queue<K> {
    entries: HashMap<Arc<K>, Entry>,
    heap: BinaryHeap<Slot<K>>,
    /// Places handed out so far: ties in due time go in the order they were asked for, and a
    /// slot in the heap whose entry has moved since is recognised as stale.
    places: u64,
    working: usize,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// When it is due and its place, while it waits.
    due: Option<(Instant, u64)>,
    working: bool,
    /// Asked for while working: due at this time once the work is done.
    again: Option<Instant>,
}

#[derive(Debug)]
struct Slot<K> {
    at: Instant,
    place: u64,
    key: Arc<K>,
}

impl<K> PartialEq for Slot<K> {
    fn eq(&self, other: &Self) -> bool {
        self.place == other.place
    }
}

impl<K> Eq for Slot<K> {}

impl<K> PartialOrd for Slot<K> {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl<K> Ord for Slot<K> {
    /// The heap is a max-heap: the earliest due (then the earliest asked for) is the greatest.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.at, other.place).cmp(&(self.at, self.place))
    }
}

impl<K: Hash + Eq> Default for Queue<K> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            heap: BinaryHeap::new(),
            places: 0,
            working: 0,
        }
    }
}

impl<K: Hash + Eq> Queue<K> {
    /// Asks for `key` to be worked on at `at`. An object already waiting keeps the earlier of
    /// its two times; one being worked on is due again at `at` once its work is done.
    pub(super) fn schedule(&mut self, key: K, at: Instant) {
        match self.entries.get_mut(&key) {
            Some(entry) if entry.working => {
                entry.again = Some(entry.again.map_or(at, |t| t.min(at)));
            }
            Some(entry) => {
                if entry.due.is_some_and(|(due, _)| due <= at) {
                    return;
                }
                let place = self.places;
                self.places += 1;
                entry.due = Some((at, place));
                if let Some((key, _)) = self.entries.get_key_value(&key) {
                    let key = Arc::clone(key);
                    self.heap.push(Slot { at, place, key });
                    self.compact();
                }
            }
            None => {
                let place = self.places;
                self.places += 1;
                let key = Arc::new(key);
                self.entries.insert(
                    Arc::clone(&key),
                    Entry {
                        due: Some((at, place)),
                        working: false,
                        again: None,
                    },
                );
                self.heap.push(Slot { at, place, key });
            }
        }
    }

    /// The waiting object due first, if it is due by `now`, and when it fell due: it is
    /// working from here on, until [`Self::done`].
    pub(super) fn pop(&mut self, now: Instant) -> Option<(Arc<K>, Instant)> {
        self.drop_stale();
        if self.heap.peek()?.at > now {
            return None;
        }
        let slot = self.heap.pop()?;
        let entry = self.entries.get_mut(&slot.key)?;
        entry.due = None;
        entry.working = true;
        self.working += 1;
        Some((slot.key, slot.at))
    }

    /// When the waiting object due first is due.
    pub(super) fn next_due(&mut self) -> Option<Instant> {
        self.drop_stale();
        self.heap.peek().map(|slot| slot.at)
    }

    /// The work on `key` is done; it is due again at `next` (or when it was asked for in the
    /// meantime, whichever is earlier), or leaves the queue.
    pub(super) fn done(&mut self, key: &K, next: Option<Instant>) {
        let Some(owned) = self.entries.get_key_value(key).map(|(k, _)| Arc::clone(k)) else {
            return;
        };
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        if !entry.working {
            return;
        }
        entry.working = false;
        self.working -= 1;
        let at = match (next, entry.again.take()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match at {
            Some(at) => {
                let place = self.places;
                self.places += 1;
                entry.due = Some((at, place));
                self.heap.push(Slot {
                    at,
                    place,
                    key: owned,
                });
                self.compact();
            }
            None => {
                self.entries.remove(key);
            }
        }
    }

    /// Objects being worked on.
    pub(super) fn working(&self) -> usize {
        self.working
    }

    /// Objects waiting (due or not).
    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        self.entries.values().filter(|e| e.due.is_some()).count()
    }

    /// Pops the slots at the top whose objects moved to an earlier time since (or left).
    fn drop_stale(&mut self) {
        while let Some(top) = self.heap.peek() {
            let current = self
                .entries
                .get(&top.key)
                .and_then(|e| e.due)
                .is_some_and(|(_, place)| place == top.place);
            if current {
                return;
            }
            self.heap.pop();
        }
    }

    /// Rebuilds the heap when stale slots outnumber the live ones: objects asked for again and
    /// again before they fall due leave one stale slot each.
    fn compact(&mut self) {
        if self.heap.len() <= 2 * self.entries.len() + 1024 {
            return;
        }
        let live = self.entries.iter().filter_map(|(key, entry)| {
            entry.due.map(|(at, place)| Slot {
                at,
                place,
                key: Arc::clone(key),
            })
        });
        self.heap = live.collect();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(base: Instant, s: u64) -> Instant {
        base + Duration::from_secs(s)
    }

    fn drain(q: &mut Queue<&'static str>, now: Instant) -> Vec<&'static str> {
        let mut out = Vec::new();
        while let Some((k, _)) = q.pop(now) {
            out.push(*k);
        }
        out
    }

    #[test]
    fn the_object_due_first_goes_first_then_in_the_order_asked() {
        let t = Instant::now();
        let mut q = Queue::default();
        q.schedule("late", at(t, 50));
        q.schedule("early", at(t, 10));
        q.schedule("early again", at(t, 10));
        q.schedule("middle", at(t, 30));
        assert_eq!(q.next_due(), Some(at(t, 10)));
        assert_eq!(q.pop(at(t, 9)), None, "nothing is due yet");
        assert_eq!(
            drain(&mut q, at(t, 100)),
            ["early", "early again", "middle", "late"]
        );
        assert_eq!(q.working(), 4);
        assert_eq!(q.waiting(), 0);
    }

    #[test]
    fn an_object_waits_once_at_the_earlier_of_its_times() {
        let t = Instant::now();
        let mut q = Queue::default();
        q.schedule("a", at(t, 30));
        q.schedule("b", at(t, 20));
        q.schedule("a", at(t, 10));
        q.schedule("a", at(t, 40));
        assert_eq!(q.waiting(), 2);
        assert_eq!(q.next_due(), Some(at(t, 10)));
        assert_eq!(drain(&mut q, at(t, 100)), ["a", "b"], "a once, at 10");
    }

    #[test]
    fn an_object_asked_for_while_working_waits_until_its_work_is_done() {
        let t = Instant::now();
        let mut q = Queue::default();
        q.schedule("a", t);
        assert_eq!(q.pop(t).map(|(k, _)| *k), Some("a"));
        q.schedule("a", at(t, 1));
        assert_eq!(q.pop(at(t, 5)), None, "never twice at once");
        // Done, due again in 30 s by its own account: the earlier ask wins.
        q.done(&"a", Some(at(t, 30)));
        assert_eq!(q.next_due(), Some(at(t, 1)));
        assert_eq!(
            q.pop(at(t, 5)),
            Some((Arc::new("a"), at(t, 1))),
            "due since 1 s"
        );
        q.done(&"a", Some(at(t, 30)));
        assert_eq!(q.next_due(), Some(at(t, 30)));
    }

    #[test]
    fn an_object_done_and_not_due_again_leaves_the_queue() {
        let t = Instant::now();
        let mut q = Queue::default();
        q.schedule("a", t);
        let (a, _) = q.pop(t).unwrap();
        q.done(&a, None);
        assert_eq!(q.working(), 0);
        assert_eq!(q.next_due(), None);
        assert!(q.entries.is_empty());
        // And comes back when asked for.
        q.schedule("a", at(t, 2));
        assert_eq!(drain(&mut q, at(t, 2)), ["a"]);
    }

    #[test]
    fn stale_slots_are_compacted_away() {
        let t = Instant::now();
        let mut q = Queue::default();
        q.schedule("a", at(t, 100_000));
        for s in (0..10_000).rev() {
            q.schedule("a", at(t, s));
        }
        assert!(
            q.heap.len() <= 2 * q.entries.len() + 1025,
            "{}",
            q.heap.len()
        );
        assert_eq!(q.next_due(), Some(t));
        assert_eq!(drain(&mut q, at(t, 100_000)), ["a"]);
    }

    /// A property: however asks, pops and completions interleave, an object is never handed
    /// out twice at once, every pop is the earliest due waiting object, and nothing asked for
    /// is lost.
    #[test]
    fn a_random_run_keeps_the_invariants() {
        let t = Instant::now();
        let mut q = Queue::default();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let keys = ["a", "b", "c", "d", "e"];
        // What the test expects: per key, working, and the earliest time it is owed.
        let mut model: HashMap<&str, (bool, Option<u64>)> = HashMap::new();
        let mut now = 0u64;
        let mut held: Vec<Arc<&str>> = Vec::new();
        for _ in 0..20_000 {
            match next() % 4 {
                0 | 1 => {
                    let k = keys[(next() % 5) as usize];
                    let due = now + next() % 20;
                    q.schedule(k, at(t, due));
                    let m = model.entry(k).or_default();
                    m.1 = Some(m.1.map_or(due, |d| d.min(due)));
                }
                2 => {
                    now += next() % 3;
                    if let Some((k, fell_due)) = q.pop(at(t, now)) {
                        let (working, owed) = model[*k];
                        assert!(!working, "{k} handed out twice at once");
                        let due = owed.unwrap();
                        assert!(due <= now);
                        assert_eq!(fell_due, at(t, due), "the time it fell due");
                        // No other waiting object was due earlier.
                        for (other, (working, d)) in &model {
                            if !working && other != &*k {
                                assert!(d.is_none_or(|d| d >= due), "{other} was due first");
                            }
                        }
                        model.insert(*k, (true, None));
                        held.push(k);
                    }
                }
                _ => {
                    if !held.is_empty() {
                        let k = held.swap_remove((next() as usize) % held.len());
                        let again = (next() % 2 == 0).then(|| now + next() % 20);
                        q.done(&k, again.map(|s| at(t, s)));
                        let m = model.get_mut(*k).unwrap();
                        m.0 = false;
                        if let Some(s) = again {
                            m.1 = Some(m.1.map_or(s, |d| d.min(s)));
                        }
                    }
                }
            }
        }
        // Nothing asked for is lost: every owed object comes out.
        for k in held.drain(..) {
            q.done(&k, None);
            model.get_mut(*k).unwrap().0 = false;
        }
        let mut out = drain(&mut q, at(t, now + 100));
        out.sort_unstable();
        let mut owed: Vec<&str> = model
            .iter()
            .filter(|(_, (_, d))| d.is_some())
            .map(|(k, _)| *k)
            .collect();
        owed.sort_unstable();
        assert_eq!(out, owed);
    }
}
