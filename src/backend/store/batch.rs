//! Group commit: writes to one product that arrive while another is being
//! written wait for it and then go through the pipeline together, in one
//! transaction, one after the other.
//!
//! Writers of one product are serialized by its pool row (or the file's
//! write lock) in any case; this makes each of them cost one turn of the
//! pipeline inside a transaction instead of a whole transaction of its own,
//! so the lock changes hands once per batch instead of once per write.
//!
//! Each write is decided on the rows as the writes before it in the batch
//! left them, exactly as if it had come alone a moment later: the
//! pipeline's order, checks and answers are unchanged. A refusal writes
//! nothing (the pipeline decides before it writes), so the others in the
//! batch go on; a store failure fails the whole batch, and a write is
//! acknowledged only once the batch has committed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::mpsc::{Sender, channel};

use super::{Principal, Store, pipeline};
use crate::backend::{BackendError, Written};
use crate::domain::AllocationWrite;

/// The most writes one transaction takes; the rest wait for the next.
const MOST: usize = 64;

type Answer = Result<Written, BackendError>;

/// One write waiting for its batch.
struct Waiting {
    who: Principal,
    write: AllocationWrite,
    answer: Sender<Answer>,
}

/// The writes waiting per account and product. A product present here has
/// a leader: the thread that found it absent writes batches until none is
/// left waiting.
#[derive(Default)]
pub struct Batches {
    waiting: Mutex<HashMap<(String, String), Vec<Waiting>>>,
}

fn poisoned<T>(_: T) -> BackendError {
    BackendError::Unavailable("store lock poisoned".into())
}

impl Store {
    /// Writes `w` in the next batch of its product: as its leader, or by
    /// waiting for the leader to write it.
    pub(super) fn write_batched(
        &self,
        account: &str,
        who: &Principal,
        w: &AllocationWrite,
    ) -> Answer {
        let key = (account.to_string(), w.product.clone());
        let (answer, answered) = channel();
        let me = Waiting {
            who: who.clone(),
            write: w.clone(),
            answer,
        };
        {
            let mut waiting = self.batches.waiting.lock().map_err(poisoned)?;
            if let Some(queue) = waiting.get_mut(&key) {
                queue.push(me);
                drop(waiting);
                return answered.recv().unwrap_or_else(|_| {
                    Err(BackendError::Unavailable(
                        "the write's batch was lost".into(),
                    ))
                });
            }
            waiting.insert(key.clone(), vec![me]);
        }
        loop {
            {
                let mut waiting = self.batches.waiting.lock().map_err(poisoned)?;
                if waiting.get(&key).is_none_or(Vec::is_empty) {
                    waiting.remove(&key);
                    break;
                }
            }
            self.write_together(account, &key);
        }
        answered
            .recv()
            .unwrap_or_else(|_| Err(BackendError::Unavailable("the write was lost".into())))
    }

    /// Runs the next batch of `key` through the pipeline in one
    /// transaction and answers each write. The batch is taken once the
    /// transaction holds the pool's lock, so the writes that arrived while
    /// it waited for the lock (another process's batch) are in it.
    fn write_together(&self, account: &str, key: &(String, String)) {
        let mut batch: Vec<Waiting> = Vec::new();
        let outcome = self.transaction_then(|tx| {
            // Waits for the pool row's lock (the file's write lock is held
            // already by the embedded store's transaction).
            tx.pool(account, &key.1)?;
            batch = {
                let mut waiting = self.batches.waiting.lock().map_err(poisoned)?;
                let queue = waiting.entry(key.clone()).or_default();
                let n = queue.len().min(MOST);
                queue.drain(..n).collect()
            };
            let writes: Vec<_> = batch.iter().map(|w| (&w.who, &w.write)).collect();
            let answers = pipeline::write_all(tx, account, &writes)?;
            // A batch of refusals only is rolled back: it leaves the store
            // exactly as it was, to the account's sequence.
            let commit = answers.iter().any(Result::is_ok);
            Ok((answers, commit))
        });
        match outcome {
            Ok(answers) => {
                for (w, answer) in batch.iter().zip(answers) {
                    let _ = w.answer.send(answer);
                }
            }
            Err(e) => {
                // Failed before the batch was taken (the store is down):
                // every write waiting gets the error, none waits for ever.
                if batch.is_empty()
                    && let Ok(mut waiting) = self.batches.waiting.lock()
                {
                    batch = waiting.entry(key.clone()).or_default().drain(..).collect();
                }
                for w in &batch {
                    let _ = w.answer.send(Err(e.clone()));
                }
            }
        }
    }
}
