//! Reading the outbox: the durable, numbered record of every change, shared by every
//! process on the same storage (`docs/design.md`, "Notifications: the outbox").

use std::time::Duration;

use futures::Stream;
use tokio::sync::watch;

use super::Registry;
use crate::error::Result;
use crate::events::{ConsumerRecord, EventPage, StoredEvent};

/// How many entries [`Registry::events_from`] reads at a time.
const STREAM_PAGE: usize = 256;

impl Registry {
    /// Events numbered after `after`, in order, at most `limit`: start with 0 (or a
    /// cursor kept from before) and pass [`EventPage::next_after`] next time.
    ///
    /// Every change the registry commits, by this process or any other sharing the
    /// storage, is here, in the same atomic change as the state it describes. A page
    /// never holds an event whose number may still be preceded by one not yet visible:
    /// on PostgreSQL, where concurrent transactions take numbers before they commit,
    /// the page stops short of a missing number until every transaction that could
    /// still fill it has ended. A page may be empty while more events exist behind
    /// such a gap; read again later.
    pub async fn events_after(&self, after: u64, limit: usize) -> Result<EventPage> {
        let meta = &self.inner.meta;
        let mut page = EventPage {
            events: Vec::new(),
            next_after: after,
            missed_through: 0,
        };
        // Numbers below this that are missing are gone for good: a transaction that
        // took one rolled back.
        let mut gone_below = 0;
        while page.events.len() < limit {
            let want = limit - page.events.len();
            let read = meta.events_after(page.next_after, want).await?;
            // Fewer than asked for: there is no more right now.
            let exhausted = read.events.len() < want;
            if read.trimmed_through > page.next_after {
                // Trimmed before this reader got them (a durable consumer's cursor
                // holds trimming back; an ad-hoc reader's does not).
                page.missed_through = read.trimmed_through;
                page.next_after = read.trimmed_through;
            }
            let mut gap_before = None;
            for e in read.events {
                if e.seq <= page.next_after {
                    continue; // trimmed bound moved past it
                }
                let missing = e.seq != page.next_after + 1;
                if missing && read.horizon.is_some() && e.seq > gone_below {
                    gap_before = Some(e.seq);
                    break;
                }
                page.next_after = e.seq;
                page.events.push(e);
            }
            match (gap_before, read.horizon) {
                (Some(upto), Some(horizon)) if meta.outbox_settled(horizon).await? => {
                    // Every transaction that could fill the gap has ended: what is
                    // visible now is all there will be. Read again (a fresh snapshot
                    // sees the ones that committed), skipping what is still missing.
                    gone_below = upto;
                }
                (Some(_), _) => break, // may still fill: stop before it
                (None, _) if exhausted => break,
                (None, _) => {}
            }
        }
        Ok(page)
    }

    /// The highest event number handed out so far (0: none yet).
    pub async fn events_head(&self) -> Result<u64> {
        self.inner.meta.events_head().await
    }

    /// Every event after `after`, as a stream that waits for new ones: woken at once by
    /// this process's changes, and polling every `poll` for other processes' (which it
    /// sees only through the storage). Ends only with an error. Events trimmed before
    /// they were read are skipped with a warning (see [`EventPage::missed_through`]).
    pub fn events_from(
        &self,
        after: u64,
        poll: Duration,
    ) -> impl Stream<Item = Result<StoredEvent>> + Send + 'static {
        struct State {
            registry: Registry,
            signal: watch::Receiver<u64>,
            cursor: u64,
            buffered: std::collections::VecDeque<StoredEvent>,
            failed: bool,
        }
        let state = State {
            registry: self.clone(),
            signal: self.event_signal(),
            cursor: after,
            buffered: Default::default(),
            failed: false,
        };
        futures::stream::unfold(state, move |mut s| async move {
            if s.failed {
                return None;
            }
            loop {
                if let Some(e) = s.buffered.pop_front() {
                    return Some((Ok(e), s));
                }
                // Marked before reading: a change committed after this point wakes us.
                s.signal.mark_unchanged();
                match s.registry.events_after(s.cursor, STREAM_PAGE).await {
                    Ok(page) => {
                        if page.missed_through > 0 {
                            tracing::warn!(
                                through = page.missed_through,
                                "events were trimmed before this reader got them"
                            );
                        }
                        s.cursor = page.next_after;
                        if page.events.is_empty() {
                            let _ = tokio::time::timeout(poll, s.signal.changed()).await;
                        }
                        s.buffered.extend(page.events);
                    }
                    Err(e) => {
                        s.failed = true;
                        return Some((Err(e), s));
                    }
                }
            }
        })
    }

    /// A receiver that changes whenever this process commits a change (and so writes
    /// events): delivery loops wait on it instead of polling fast. Other processes'
    /// changes do not reach it; poll for those.
    pub fn event_signal(&self) -> watch::Receiver<u64> {
        self.inner
            .written
            .get_or_init(|| watch::channel(0).0)
            .subscribe()
    }

    /// Waits until this process commits a change or `timeout` passes, whichever is
    /// first. A change committed just before the call does not end the wait: loops
    /// that must not miss one hold an [`event_signal`](Self::event_signal) instead.
    pub async fn wait_for_events(&self, timeout: Duration) {
        let mut signal = self.event_signal();
        signal.mark_unchanged();
        let _ = tokio::time::timeout(timeout, signal.changed()).await;
    }

    /// Takes (or renews) `owner`'s delivery lease on the durable consumer `consumer`
    /// for `lease`, creating the consumer at the current head if it is new (it is sent
    /// what happens from now on, not the retained history). The consumer's cursor if
    /// `owner` holds the lease now; `None` while another owner holds an unexpired one.
    /// Processes sharing a storage use one consumer name per destination, so one of
    /// them delivers at a time.
    pub async fn claim_events(
        &self,
        consumer: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<Option<u64>> {
        self.inner
            .meta
            .claim_consumer(consumer, owner, self.now(), lease)
            .await
    }

    /// Records that `consumer` has everything up to `cursor` and renews `owner`'s
    /// lease; `false` if `owner` lost the lease (stop delivering and claim again).
    /// Trimming never removes an event a consumer heard from in the last week has not
    /// acknowledged.
    pub async fn ack_events(
        &self,
        consumer: &str,
        owner: &str,
        cursor: u64,
        lease: Duration,
    ) -> Result<bool> {
        self.inner
            .meta
            .ack_consumer(consumer, owner, cursor, self.now(), lease)
            .await
    }

    /// Every durable consumer and its cursor.
    pub async fn event_consumers(&self) -> Result<Vec<(String, ConsumerRecord)>> {
        self.inner.meta.consumers().await
    }

    /// Removes events every consumer has acknowledged that are older than `retention`
    /// or beyond the newest `max_events`. Returns how many it removed. The collector
    /// calls it on each run (with [`GcOptions`](crate::GcOptions)'s settings).
    pub async fn trim_events(&self, retention: Duration, max_events: u64) -> Result<u64> {
        let mut removed = 0;
        loop {
            let n = self
                .inner
                .meta
                .trim_events(self.now(), retention, max_events)
                .await?;
            if n == 0 {
                return Ok(removed);
            }
            removed += n;
        }
    }
}
