//! Admission and drain: a bounded number of requests in flight (`limits.max_streams`), and a
//! shutdown that refuses new requests and waits for those in flight before the transport closes
//! their connections.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tonic::Status;

pub struct Drain {
    /// Requests (and Get streams) holding an [`Active`] right now.
    active: AtomicUsize,
    /// Requests allowed in flight at once (`limits.max_streams`).
    max: usize,
    /// Set once shutdown starts: every later request is refused.
    closing: AtomicBool,
    /// Notified when the last [`Active`] goes, for [`Drain::close`].
    idle: Notify,
    /// Places lent to responses handed whole to the transport, oldest first, with the instant
    /// each is taken back (see [`Drain::lend`]).
    lent: Mutex<VecDeque<(tokio::time::Instant, Weak<Slot>)>>,
}

/// A lent place, emptied when it is taken back.
type Slot = Mutex<Option<Active>>;

/// A place lent to a response the transport holds; given back when dropped, or by
/// [`Drain::take_back_expired`] at its deadline.
pub struct Lent {
    _slot: Arc<Slot>,
}

/// Held for as long as a request (or a Get's stream) runs.
pub struct Active(Arc<Drain>);

impl Drop for Active {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Active {
    /// Another hold on the same drain, for work that outlives the handler (a Get's stream);
    /// taken while this one is held, so it is never refused.
    pub fn also(&self) -> Active {
        self.0.active.fetch_add(1, Ordering::AcqRel);
        Active(self.0.clone())
    }
}

impl Drain {
    pub fn new(max: usize) -> Self {
        Self {
            active: Default::default(),
            max,
            closing: Default::default(),
            idle: Default::default(),
            lent: Mutex::default(),
        }
    }

    /// Lends `active` to a response handed whole to the transport: a client that reads it
    /// holds the place until it is done, one that does not, only until `until`. Only the place
    /// is taken back; the transport keeps the bytes it was given, as with a paced stream cut.
    pub fn lend(&self, active: Active, until: tokio::time::Instant) -> Lent {
        let slot = Arc::new(Mutex::new(Some(active)));
        let mut lent = self.lent.lock().unwrap_or_else(|p| p.into_inner());
        // Responses read in time are done long before their deadline: drop them from the front
        // as they go, so the queue holds little more than the responses still unread.
        while lent.front().is_some_and(|(_, w)| w.strong_count() == 0) {
            lent.pop_front();
        }
        lent.push_back((until, Arc::downgrade(&slot)));
        Lent { _slot: slot }
    }

    /// Takes back the places of lent responses past their deadline, every `every`, for as long
    /// as the service runs.
    pub async fn take_back_expired(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = tokio::time::Instant::now();
            let expired: Vec<_> = {
                let mut lent = self.lent.lock().unwrap_or_else(|p| p.into_inner());
                let mut expired = Vec::new();
                // Deadlines are in lending order: they all come from one idle timeout.
                while lent.front().is_some_and(|(until, _)| *until <= now) {
                    if let Some((_, slot)) = lent.pop_front() {
                        expired.extend(slot.upgrade());
                    }
                }
                expired
            };
            for slot in expired {
                slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            }
        }
    }

    /// Takes a place among the requests in flight: `UNAVAILABLE` while draining,
    /// `RESOURCE_EXHAUSTED` when `limits.max_streams` are taken.
    pub fn enter(self: &Arc<Self>) -> Result<Active, Status> {
        let before = self.active.fetch_add(1, Ordering::AcqRel);
        let active = Active(self.clone());
        if self.closing.load(Ordering::Acquire) {
            return Err(Status::unavailable("shutting down"));
        }
        if before >= self.max {
            return Err(Status::resource_exhausted(format!(
                "limits.max_streams: {} requests are in flight on this replica; retry later",
                self.max
            )));
        }
        Ok(active)
    }

    /// Refuses new requests and waits until those in flight have finished.
    pub async fn close(&self) {
        self.closing.store(true, Ordering::Release);
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.active.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn close_waits_for_every_request_and_stream_in_flight() {
        let drain = Arc::new(Drain::new(8));
        let request = drain.enter().unwrap();
        let stream = request.also();
        let closing = tokio::spawn({
            let drain = drain.clone();
            async move { drain.close().await }
        });
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!closing.is_finished(), "closed with two requests in flight");
        assert_eq!(
            drain.enter().err().map(|s| s.code()),
            Some(tonic::Code::Unavailable),
            "a new request is refused while draining"
        );
        drop(request);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(
            !closing.is_finished(),
            "closed while a Get stream still ran"
        );
        drop(stream);
        tokio::time::timeout(Duration::from_secs(1), closing)
            .await
            .expect("closed once the last stream ended")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_lent_place_comes_back_at_its_deadline_or_when_the_response_is_done() {
        let drain = Arc::new(Drain::new(2));
        tokio::spawn(drain.clone().take_back_expired(Duration::from_secs(1)));
        let now = tokio::time::Instant::now();
        // One response its client never reads, one read at once.
        let unread = drain.lend(drain.enter().unwrap(), now + Duration::from_secs(30));
        let read = drain.lend(drain.enter().unwrap(), now + Duration::from_secs(30));
        assert!(drain.enter().is_err(), "both places are lent");
        drop(read);
        let third = drain.enter().expect("a response read gives its place back");
        assert!(drain.enter().is_err());
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert!(drain.enter().is_err(), "taken back before the deadline");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let _fourth = drain
            .enter()
            .expect("the unread response's place is taken back at its deadline");
        drop((unread, third));
    }

    #[tokio::test]
    async fn requests_beyond_the_limit_are_refused_and_places_come_back() {
        let drain = Arc::new(Drain::new(2));
        let a = drain.enter().unwrap();
        let _b = drain.enter().unwrap();
        let refused = drain.enter().err().expect("a third request is refused");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("limits.max_streams"));
        drop(a);
        assert!(drain.enter().is_ok(), "a freed place is taken again");
    }
}
