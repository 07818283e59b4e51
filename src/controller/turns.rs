//! Turns: at most `slots` reconciles work at once, and when more wait, the one whose object
//! fell due first goes first. kube-runtime's own queue, once its reconcilers are busy, hands
//! out waiting objects in hash order, so under load some objects could wait indefinitely while
//! others are probed again and again; the controller therefore lets every reconcile start and
//! makes it wait here for a turn. A waiting reconcile holds only its object and a place in a
//! heap: O(log n) per turn.

use std::{cmp::Ordering as CmpOrdering, collections::BinaryHeap};

use tokio::sync::oneshot;

use super::*;

/// The turns of one controller.
#[derive(Debug)]
pub(super) struct Turns {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Slots nobody holds (only while nobody waits).
    free: usize,
    waiting: BinaryHeap<Waiter>,
    /// Arrivals so far: ties in due time go in arrival order.
    arrivals: u64,
    /// The controller is stopping: nobody gets a turn any more.
    closed: bool,
}

#[derive(Debug)]
struct Waiter {
    due: Timestamp,
    arrival: u64,
    wake: oneshot::Sender<()>,
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}

impl Eq for Waiter {}

impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for Waiter {
    /// The heap is a max-heap: the earliest due (then the earliest arrival) is the greatest.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.due, other.arrival).cmp(&(self.due, self.arrival))
    }
}

/// One slot, held until dropped.
#[derive(Debug)]
pub(super) struct Turn<'a> {
    turns: &'a Turns,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.turns.release();
    }
}

/// A place in the queue; a slot handed to it after its reconcile was dropped is passed on.
struct Place<'a> {
    turns: &'a Turns,
    wake: Option<oneshot::Receiver<()>>,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if let Some(mut wake) = self.wake.take() {
            wake.close();
            if wake.try_recv().is_ok() {
                self.turns.release();
            }
        }
    }
}

impl Turns {
    /// Turns for `slots` reconciles at once (at least one).
    pub(super) fn new(slots: usize) -> Self {
        Self {
            state: Mutex::new(State {
                free: slots.max(1),
                waiting: BinaryHeap::new(),
                arrivals: 0,
                closed: false,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for a slot, behind everyone due before `due`; `None` once the turns are closed.
    pub(super) async fn wait(&self, due: Timestamp) -> Option<Turn<'_>> {
        let wake = {
            let mut state = self.state();
            if state.closed {
                return None;
            }
            if state.free > 0 {
                state.free -= 1;
                return Some(Turn { turns: self });
            }
            let (wake, woken) = oneshot::channel();
            let arrival = state.arrivals;
            state.arrivals += 1;
            state.waiting.push(Waiter { due, arrival, wake });
            woken
        };
        let mut place = Place {
            turns: self,
            wake: Some(wake),
        };
        let woken = match place.wake.as_mut() {
            Some(wake) => wake.await.is_ok(),
            None => false,
        };
        place.wake = None;
        woken.then_some(Turn { turns: self })
    }

    /// Hands a slot to the waiter due first, or frees it.
    fn release(&self) {
        let mut state = self.state();
        while let Some(waiter) = state.waiting.pop() {
            // A waiter whose reconcile was dropped cannot take it: the next one can.
            if waiter.wake.send(()).is_ok() {
                return;
            }
        }
        state.free += 1;
    }

    /// Turns every waiter away, now and from now on (the controller is stopping: a reconcile
    /// that has not started need not run).
    pub(super) fn close(&self) {
        let mut state = self.state();
        state.closed = true;
        state.waiting.clear();
    }

    /// Reconciles waiting for a slot.
    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        self.state().waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;

    use futures::poll;

    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[tokio::test]
    async fn slots_go_to_the_waiter_due_first_then_in_arrival_order() {
        let turns = Turns::new(1);
        let first = turns.wait(at(100)).await.unwrap();
        let order = Mutex::new(Vec::new());
        let waiter = |name: &'static str, due: i64| {
            let (turns, order) = (&turns, &order);
            async move {
                let _turn = turns.wait(at(due)).await.unwrap();
                order.lock().unwrap().push(name);
            }
        };
        // Arrive in this order; due: late, early, early again (after "early"), middle.
        let mut late = pin!(waiter("late", 50));
        let mut early = pin!(waiter("early", 10));
        let mut early_again = pin!(waiter("early again", 10));
        let mut middle = pin!(waiter("middle", 30));
        assert!(poll!(late.as_mut()).is_pending());
        assert!(poll!(early.as_mut()).is_pending());
        assert!(poll!(early_again.as_mut()).is_pending());
        assert!(poll!(middle.as_mut()).is_pending());
        assert_eq!(turns.waiting(), 4);
        drop(first);
        futures::join!(late, early, early_again, middle);
        assert_eq!(
            *order.lock().unwrap(),
            ["early", "early again", "middle", "late"]
        );
        assert_eq!(turns.waiting(), 0);
    }

    #[tokio::test]
    async fn as_many_work_at_once_as_there_are_slots() {
        let turns = Turns::new(2);
        let a = turns.wait(at(1)).await.unwrap();
        let _b = turns.wait(at(2)).await.unwrap();
        let mut c = pin!(turns.wait(at(0)));
        assert!(poll!(c.as_mut()).is_pending(), "a third while two work");
        drop(a);
        assert!(poll!(c.as_mut()).is_ready());
    }

    #[tokio::test]
    async fn a_slot_handed_to_a_dropped_waiter_is_passed_on() {
        let turns = Turns::new(1);
        let first = turns.wait(at(0)).await.unwrap();
        // Gone before it is woken.
        let mut gone = Box::pin(turns.wait(at(1)));
        assert!(poll!(gone.as_mut()).is_pending());
        drop(gone);
        // Woken (the slot sent to it), then dropped before it ran.
        let mut woken = Box::pin(turns.wait(at(2)));
        assert!(poll!(woken.as_mut()).is_pending());
        let mut next = pin!(turns.wait(at(3)));
        assert!(poll!(next.as_mut()).is_pending());
        drop(first);
        drop(woken);
        let turn = next.await;
        assert!(turn.is_some(), "the slot was lost");
        drop(turn);
        // And only one slot exists still.
        let _one = turns.wait(at(4)).await.unwrap();
        assert!(poll!(pin!(turns.wait(at(5)))).is_pending());
    }

    #[tokio::test]
    async fn closing_turns_waiters_away() {
        let turns = Turns::new(1);
        let _first = turns.wait(at(0)).await.unwrap();
        let mut waiting = pin!(turns.wait(at(1)));
        assert!(poll!(waiting.as_mut()).is_pending());
        turns.close();
        assert!(waiting.await.is_none());
        assert!(turns.wait(at(2)).await.is_none());
    }
}
