//! Group commit: writes to one product that arrive while another is being
//! written wait for it and then go through the pipeline together, in one
//! transaction, one after the other.
//!
//! Writers of one product are serialized by its pool (the file's write
//! lock, or the pool's lock in PostgreSQL) in any case; this makes each of
//! them cost one turn of the pipeline inside a transaction instead of a
//! whole transaction of its own, so the lock changes hands once per batch
//! instead of once per write.
//!
//! Each write is decided on the rows as the writes before it in the batch
//! left them, exactly as if it had come alone a moment later: the
//! pipeline's order, checks and answers are unchanged. A refusal writes
//! nothing (the pipeline decides before it writes), so the others in the
//! batch go on; a store failure fails the whole batch, and a write is
//! acknowledged only once the batch has committed.
//!
//! The batches of a product are written by one thread at a time, its
//! leader. A caller on a thread of its own (the CLI, the operator) leads on
//! it: it writes batches until its own write is answered and then hands the
//! lead to the first write still waiting, or, none waiting, ends it. (A
//! leader that went on until no one waited would hold its own answer back
//! for as long as writes kept coming: under steady load, the slowest
//! answers by far.) An async caller (`licensor serve`) waits in its task,
//! holding no thread; the one that finds no leader starts a writer on a
//! blocking thread, which answers every write, its starter's too, and goes
//! on until no write waits: nobody's answer waits for it to stop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::mpsc::{UnboundedReceiver as Receiver, UnboundedSender as Sender};

use super::{Principal, Store, pipeline};
use crate::backend::{BackendError, Written};
use crate::domain::AllocationWrite;

/// The most writes one transaction takes; the rest wait for the next.
const MOST: usize = 64;

/// What a write is answered.
pub type Answer<R> = Result<R, BackendError>;

/// What a waiting write is told: its answer, or that it leads now.
enum Turn<R> {
    Answer(Answer<R>),
    Lead,
}

/// One write waiting for its batch.
struct Waiting<T, R> {
    write: T,
    told: Sender<Turn<R>>,
}

/// An account and a product: the writes of one key are batched together.
type Key = (String, String);

/// The writes waiting, per key. A key present has a leader.
type Waits<T, R> = HashMap<Key, Vec<Waiting<T, R>>>;

/// The writes waiting for their batches, per key.
pub struct Queues<T, R> {
    waiting: Mutex<Waits<T, R>>,
}

impl<T, R> Default for Queues<T, R> {
    fn default() -> Self {
        Queues {
            waiting: Mutex::new(HashMap::new()),
        }
    }
}

fn lost() -> BackendError {
    BackendError::Unavailable("the write's batch was lost".into())
}

impl<T, R> Queues<T, R> {
    /// The queues, even if a thread panicked holding them: every change
    /// to them is one push, drain or removal, never left half done.
    fn lock(&self) -> MutexGuard<'_, Waits<T, R>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `write` under `key`: whether the caller leads now, and where
    /// its turn comes (its answer, or the lead).
    fn enqueue(&self, key: &Key, write: T) -> (bool, Receiver<Turn<R>>) {
        let (told, turn) = tokio::sync::mpsc::unbounded_channel();
        let me = Waiting { write, told };
        let mut waiting = self.lock();
        match waiting.get_mut(key) {
            Some(queue) => {
                queue.push(me);
                (false, turn)
            }
            None => {
                waiting.insert(key.clone(), vec![me]);
                (true, turn)
            }
        }
    }

    /// Queues `write` under `key` and answers it once a batch has. The
    /// calling thread may lead meanwhile: it then runs `batch` for each
    /// batch, which takes its writes with the function it is given (once
    /// it is ready for them: the writes that came meanwhile go too) and
    /// answers them in order, or fails them all.
    pub fn submit(
        &self,
        key: Key,
        write: T,
        batch: impl FnMut(&mut dyn FnMut() -> Vec<T>) -> Result<Vec<Answer<R>>, BackendError>,
    ) -> Answer<R> {
        let (leading, mut turn) = self.enqueue(&key, write);
        if !leading {
            match turn.blocking_recv() {
                Some(Turn::Answer(answer)) => return answer,
                Some(Turn::Lead) => {}
                None => return Err(lost()),
            }
        }
        self.lead(key, turn, batch)
    }

    /// [`Queues::submit`] for an async caller: it waits for its answer
    /// without holding a thread. A caller that leads starts a writer on a
    /// blocking thread (with a batch function `batch` makes) and waits for
    /// its answer like the others: the writer goes on until no write waits,
    /// so under steady load one thread writes batch after batch, and no
    /// one's answer waits for the lead to change hands.
    pub async fn submit_async<B>(
        self: Arc<Self>,
        key: Key,
        write: T,
        batch: impl Fn() -> B + Send + Sync + 'static,
    ) -> Answer<R>
    where
        T: Send + 'static,
        R: Send + 'static,
        B: FnMut(&mut dyn FnMut() -> Vec<T>) -> Result<Vec<Answer<R>>, BackendError>,
    {
        let batch = Arc::new(batch);
        let (mut leading, mut turn) = self.enqueue(&key, write);
        loop {
            if leading {
                let (queues, key, batch) = (self.clone(), key.clone(), batch.clone());
                // Not waited for: it answers this write with the others.
                drop(tokio::task::spawn_blocking(move || {
                    queues.write_until_none_wait(key, batch())
                }));
            }
            match turn.recv().await {
                Some(Turn::Answer(answer)) => return answer,
                // A writer that panicked handed the lead on: to this write.
                Some(Turn::Lead) => leading = true,
                None => return Err(lost()),
            }
        }
    }

    /// Writes the batches of `key` until no write waits, then ends its lead.
    fn write_until_none_wait(
        &self,
        key: Key,
        mut batch: impl FnMut(&mut dyn FnMut() -> Vec<T>) -> Result<Vec<Answer<R>>, BackendError>,
    ) {
        // Handed on if this ends early (a panic); an ended lead has no key.
        let lead = Lead {
            queues: self,
            key,
            turn: None,
        };
        loop {
            self.write_together(&lead.key, &mut batch);
            let mut waiting = self.lock();
            if waiting.get(&lead.key).is_none_or(Vec::is_empty) {
                waiting.remove(&lead.key);
                return;
            }
        }
    }

    /// Leads `key`: runs batches until the leader's own write (waiting on
    /// `turn`) is answered, then hands the lead on.
    fn lead(
        &self,
        key: Key,
        turn: Receiver<Turn<R>>,
        mut batch: impl FnMut(&mut dyn FnMut() -> Vec<T>) -> Result<Vec<Answer<R>>, BackendError>,
    ) -> Answer<R> {
        // This write is in the queue until a batch answers it. The lead is
        // handed on however this ends, a panic included, so the writes
        // still waiting are never left without a leader.
        let mut lead = Lead {
            queues: self,
            key,
            turn: Some(turn),
        };
        loop {
            self.write_together(&lead.key, &mut batch);
            match lead.turn().try_recv() {
                Ok(Turn::Answer(answer)) => return answer,
                Ok(Turn::Lead) | Err(TryRecvError::Empty) => continue,
                Err(TryRecvError::Disconnected) => return Err(lost()),
            }
        }
    }

    /// Gives the lead of `key` to the first write waiting, or ends it.
    fn hand_over(&self, key: &Key) {
        let mut waiting = self.lock();
        let Some(queue) = waiting.get_mut(key) else {
            return;
        };
        // A writer that is gone can no longer lead; the next one does.
        while let Some(next) = queue.first() {
            if next.told.send(Turn::Lead).is_ok() {
                return;
            }
            queue.remove(0);
        }
        waiting.remove(key);
    }

    /// Runs one batch of `key` and answers each of its writes.
    fn write_together(
        &self,
        key: &Key,
        batch: &mut impl FnMut(&mut dyn FnMut() -> Vec<T>) -> Result<Vec<Answer<R>>, BackendError>,
    ) {
        let mut taken: Vec<Sender<Turn<R>>> = Vec::new();
        let mut take = || {
            let mut waiting = self.lock();
            let queue = waiting.entry(key.clone()).or_default();
            let n = queue.len().min(MOST);
            let (writes, told): (Vec<T>, Vec<_>) =
                queue.drain(..n).map(|w| (w.write, w.told)).unzip();
            taken = told;
            writes
        };
        let outcome = batch(&mut take);
        match outcome {
            Ok(answers) => {
                for (told, answer) in taken.iter().zip(answers) {
                    let _ = told.send(Turn::Answer(answer));
                }
            }
            Err(e) => {
                // Failed before the batch was taken (the store is down):
                // every write waiting gets the error, none waits for ever.
                if taken.is_empty() {
                    let mut waiting = self.lock();
                    let queue = waiting.entry(key.clone()).or_default();
                    taken = queue.drain(..).map(|w| w.told).collect();
                }
                for told in &taken {
                    let _ = told.send(Turn::Answer(Err(e.clone())));
                }
            }
        }
    }
}

/// The lead of a key, with the leader's own turn; handed on when dropped.
struct Lead<'a, T, R> {
    queues: &'a Queues<T, R>,
    key: Key,
    turn: Option<Receiver<Turn<R>>>,
}

impl<T, R> Lead<'_, T, R> {
    fn turn(&mut self) -> &mut Receiver<Turn<R>> {
        self.turn
            .as_mut()
            .expect("a lead has its turn until it is dropped")
    }
}

impl<T, R> Drop for Lead<'_, T, R> {
    fn drop(&mut self) {
        // The leader's own write may still be waiting (its batch panicked
        // before taking it): with its turn gone, the lead skips it.
        self.turn = None;
        self.queues.hand_over(&self.key);
    }
}

/// The allocation writes waiting to be written together.
pub type Batches = Queues<(Principal, AllocationWrite), Written>;

impl Store {
    /// Writes `w` in the next batch of its product: as its leader, or by
    /// waiting for the leader to write it.
    pub(super) fn write_batched(
        &self,
        account: &str,
        who: &Principal,
        w: &AllocationWrite,
    ) -> Answer<Written> {
        let key = (account.to_string(), w.product.clone());
        self.batches.submit(key, (who.clone(), w.clone()), |take| {
            self.write_batch(account, &w.product, take)
        })
    }

    /// [`Store::write_batched`] for an async caller (`licensor serve`): a
    /// write waiting for its batch holds no thread, and its answer comes
    /// straight to it.
    pub async fn write_async(
        self: std::sync::Arc<Store>,
        account: String,
        who: Principal,
        w: AllocationWrite,
    ) -> Answer<Written> {
        let key = (account.clone(), w.product.clone());
        let product = w.product.clone();
        let batches = self.batches.clone();
        batches
            .submit_async(key, (who, w), move || {
                let (store, account, product) = (self.clone(), account.clone(), product.clone());
                move |take: &mut dyn FnMut() -> Vec<(Principal, AllocationWrite)>| {
                    store.write_batch(&account, &product, take)
                }
            })
            .await
    }

    /// One batch of `product`'s writes, in one transaction.
    fn write_batch(
        &self,
        account: &str,
        product: &str,
        take: &mut dyn FnMut() -> Vec<(Principal, AllocationWrite)>,
    ) -> Result<Vec<Answer<Written>>, BackendError> {
        self.transaction_then(|tx| {
            // The batch is taken once the transaction holds the pool's
            // lock (the file's write lock is held already by the embedded
            // store's transaction), so the writes that came while it
            // waited for the lock (another process's batch) are in it.
            tx.pool(account, product)?;
            let batch = take();
            let writes: Vec<_> = batch.iter().map(|(who, w)| (who, w)).collect();
            let answers = pipeline::write_all(tx, account, &writes)?;
            // A batch of refusals only is rolled back: it leaves the store
            // exactly as it was, to the account's sequence.
            let commit = answers.iter().any(Result::is_ok);
            Ok((answers, commit))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{Receiver, Sender, channel};
    use std::time::Duration;

    fn key() -> Key {
        ("acme".into(), "TestOps".into())
    }

    /// A batch the test lets go: it tells which writes it took, then waits
    /// for the word to answer them (each with its own number).
    fn held(
        took: &Sender<Vec<u32>>,
        go: &Mutex<Receiver<()>>,
        take: &mut dyn FnMut() -> Vec<u32>,
    ) -> Result<Vec<Answer<u32>>, BackendError> {
        let writes = take();
        took.send(writes.clone()).unwrap();
        go.lock().unwrap().recv().unwrap();
        Ok(writes.into_iter().map(Ok).collect())
    }

    /// The leader answers as soon as its own batch has, while the write
    /// that came during that batch is written by its own thread.
    #[test]
    fn the_lead_passes_on_once_the_leaders_write_is_answered() {
        let queues: Queues<u32, u32> = Queues::default();
        let (took, batches) = channel();
        let (go, gone) = channel();
        let gone = Mutex::new(gone);
        let (returned, answers) = channel();
        std::thread::scope(|s| {
            // Dropped if the test fails, so that a held batch ends too.
            let go = go;
            let one = (&queues, &took, &gone, returned.clone());
            s.spawn(move || {
                let (queues, took, gone, returned) = one;
                let answer = queues.submit(key(), 1, |take| held(took, gone, take));
                returned.send((1, answer)).unwrap();
            });
            let wait = Duration::from_secs(10);
            assert_eq!(batches.recv_timeout(wait).unwrap(), vec![1]);
            // Write 2 comes while write 1's batch is being written.
            let two = (&queues, &took, &gone, returned.clone());
            s.spawn(move || {
                let (queues, took, gone, returned) = two;
                let answer = queues.submit(key(), 2, |take| held(took, gone, take));
                returned.send((2, answer)).unwrap();
            });
            while queues.lock().get(&key()).map_or(0, Vec::len) < 1 {
                std::thread::yield_now();
            }
            go.send(()).unwrap();
            // Write 1 is answered while write 2's batch is still held.
            assert_eq!(answers.recv_timeout(wait).unwrap(), (1, Ok(1)));
            assert_eq!(batches.recv_timeout(wait).unwrap(), vec![2]);
            go.send(()).unwrap();
            assert_eq!(answers.recv_timeout(wait).unwrap(), (2, Ok(2)));
        });
        assert!(queues.lock().is_empty(), "the lead ended with the queue");
    }

    /// Writes that come while a batch waits for the pool's lock go with
    /// it; a failed batch fails every write waiting.
    #[test]
    fn a_batch_takes_what_came_before_it_was_ready_and_a_failure_fails_all() {
        let queues: Queues<u32, u32> = Queues::default();
        let (ready, wait) = channel::<()>();
        let wait = Mutex::new(wait);
        let (took, batches) = channel();
        std::thread::scope(|s| {
            let leader = s.spawn(|| {
                queues.submit(key(), 1, |take| {
                    wait.lock().unwrap().recv().unwrap();
                    let writes = take();
                    took.send(writes.clone()).unwrap();
                    Ok(writes.into_iter().map(|w| Ok(w * 10)).collect())
                })
            });
            while queues.lock().get(&key()).is_none() {
                std::thread::yield_now();
            }
            // One after the other, so that they queue in this order.
            let others: Vec<_> = [2, 3]
                .into_iter()
                .map(|n| {
                    let q = &queues;
                    let other = s.spawn(move || q.submit(key(), n, |_| Err(lost())));
                    while queues.lock().get(&key()).map_or(0, Vec::len) < n as usize {
                        std::thread::yield_now();
                    }
                    other
                })
                .collect();
            ready.send(()).unwrap();
            assert_eq!(leader.join().unwrap(), Ok(10));
            let answers: Vec<_> = others.into_iter().map(|o| o.join().unwrap()).collect();
            assert_eq!(answers, vec![Ok(20), Ok(30)]);
        });
        assert_eq!(batches.try_iter().collect::<Vec<_>>(), vec![vec![1, 2, 3]]);

        let down = BackendError::Unavailable("the store is down".into());
        let answer = queues.submit(key(), 4, |_| Err(down.clone()));
        assert_eq!(answer, Err(down));
        assert!(queues.lock().is_empty());
    }

    /// A leader whose batch panics still hands the lead on: the write that
    /// waited behind it is written, not left waiting for ever.
    #[test]
    fn a_leader_that_panics_hands_the_lead_on() {
        // Threads of their own, not scoped: if the lead were lost, the
        // test fails on a timeout instead of waiting for ever.
        let queues: std::sync::Arc<Queues<u32, u32>> = Default::default();
        let (ready, wait) = channel::<()>();
        let leader = std::thread::spawn({
            let queues = queues.clone();
            move || {
                queues.submit(key(), 1, |_| {
                    wait.recv().unwrap();
                    panic!("a store that panics");
                })
            }
        });
        while queues.lock().get(&key()).is_none() {
            std::thread::yield_now();
        }
        let (answered, answer) = channel();
        std::thread::spawn({
            let queues = queues.clone();
            move || {
                let a = queues.submit(key(), 2, |take| {
                    let writes = take();
                    Ok(writes.into_iter().map(|w| Ok(w * 10)).collect())
                });
                answered.send(a).unwrap();
            }
        });
        while queues.lock().get(&key()).map_or(0, Vec::len) < 2 {
            std::thread::yield_now();
        }
        ready.send(()).unwrap();
        assert!(leader.join().is_err(), "the leader panicked");
        // Write 1's writer is gone, so the lead skips it: write 2 leads,
        // and its batch is write 2 alone (write 1 would answer 10).
        let answer = answer.recv_timeout(Duration::from_secs(10));
        assert_eq!(answer, Ok(Ok(20)), "write 2 was written by its own lead");
        assert!(queues.lock().is_empty());
    }

    /// A batch function for async writes: it tells on which thread it ran
    /// and which writes it took, then waits for the word to answer them
    /// (each with ten times its number); its first batch panics instead
    /// when `panics_first`.
    #[allow(clippy::type_complexity)]
    fn told_batches(
        panics_first: bool,
    ) -> (
        impl Fn() -> Box<
            dyn FnMut(&mut dyn FnMut() -> Vec<u32>) -> Result<Vec<Answer<u32>>, BackendError>,
        > + Send
        + Sync
        + 'static,
        Receiver<(std::thread::ThreadId, Vec<u32>)>,
        Sender<()>,
    ) {
        let (took, batches) = channel();
        let (go, gone) = channel::<()>();
        let gone = Arc::new(Mutex::new(gone));
        let panicked = Arc::new(std::sync::atomic::AtomicBool::new(!panics_first));
        let batch = move || {
            let (took, gone, panicked) = (took.clone(), gone.clone(), panicked.clone());
            Box::new(move |take: &mut dyn FnMut() -> Vec<u32>| {
                let writes = take();
                took.send((std::thread::current().id(), writes.clone()))
                    .unwrap();
                gone.lock().unwrap().recv().unwrap();
                if !panicked.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    panic!("a store that panics");
                }
                Ok(writes.into_iter().map(|w| Ok(w * 10)).collect())
            }) as Box<dyn FnMut(&mut dyn FnMut() -> Vec<u32>) -> _>
        };
        (batch, batches, go)
    }

    /// Queues whose writes go through `submit_async` with [`told_batches`]:
    /// the queues, a function that submits write `n` from a task of its
    /// own, and the batches' reports and word to go.
    #[allow(clippy::type_complexity)]
    fn async_writes(
        panics_first: bool,
    ) -> (
        Arc<Queues<u32, u32>>,
        impl Fn(u32) -> tokio::task::JoinHandle<Answer<u32>>,
        Receiver<(std::thread::ThreadId, Vec<u32>)>,
        Sender<()>,
    ) {
        let queues: Arc<Queues<u32, u32>> = Default::default();
        let (batch, batches, go) = told_batches(panics_first);
        let batch = Arc::new(batch);
        let submit = {
            let queues = queues.clone();
            move |n: u32| {
                let (queues, batch) = (queues.clone(), batch.clone());
                tokio::spawn(queues.submit_async(key(), n, move || batch()))
            }
        };
        (queues, submit, batches, go)
    }

    /// Waits (a while at most) until `n` writes of `key()` wait.
    async fn until_waiting(queues: &Queues<u32, u32>, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while queues.lock().get(&key()).map_or(0, Vec::len) < n {
            assert!(
                std::time::Instant::now() < deadline,
                "{n} writes never waited"
            );
            tokio::task::yield_now().await;
        }
    }

    /// Waits (a while at most) until the writer has ended its lead: it
    /// answers its last batch first, so the answers can come before.
    async fn until_ended(queues: &Queues<u32, u32>) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !queues.lock().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer never ended its lead"
            );
            tokio::task::yield_now().await;
        }
    }

    /// Async writes: the first starts one writer, which writes the writes
    /// that came during its batch in its next batch, on the same thread,
    /// and ends once none waits. Every write has its own answer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_writer_writes_async_writes_until_none_waits() {
        let (queues, submit, batches, go) = async_writes(false);
        let wait = Duration::from_secs(10);
        let one = submit(1);
        let (writer, first) = batches.recv_timeout(wait).unwrap();
        assert_eq!(first, vec![1]);
        let two = submit(2);
        until_waiting(&queues, 1).await;
        let three = submit(3);
        until_waiting(&queues, 2).await;
        go.send(()).unwrap();
        assert_eq!(one.await.unwrap(), Ok(10), "answered with its batch");
        let (thread, second) = batches.recv_timeout(wait).unwrap();
        assert_eq!((thread, second), (writer, vec![2, 3]), "the same writer");
        go.send(()).unwrap();
        assert_eq!((two.await.unwrap(), three.await.unwrap()), (Ok(20), Ok(30)));
        until_ended(&queues).await;
    }

    /// A writer that panics hands the lead to the async write waiting
    /// behind it, which starts a writer of its own; the write that was in
    /// the panicked batch is told it was lost, not left waiting.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_writer_hands_the_lead_to_an_async_write() {
        let (queues, submit, batches, go) = async_writes(true);
        let wait = Duration::from_secs(10);
        let one = submit(1);
        assert_eq!(batches.recv_timeout(wait).unwrap().1, vec![1]);
        let two = submit(2);
        until_waiting(&queues, 1).await;
        go.send(()).unwrap();
        assert_eq!(one.await.unwrap(), Err(lost()));
        assert_eq!(batches.recv_timeout(wait).unwrap().1, vec![2]);
        go.send(()).unwrap();
        let two = tokio::time::timeout(wait, two).await;
        assert_eq!(
            two.unwrap().unwrap(),
            Ok(20),
            "written by a writer of its own"
        );
        until_ended(&queues).await;
    }
}
