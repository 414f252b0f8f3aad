//! Connections to the server, pipelined, and the pool each process keeps.
//!
//! A [`Conn`] is a tokio-postgres client on a runtime of its own, driven
//! from a blocking thread (a store call runs on one). Statements that need
//! no answer (the writes of a transaction, its `BEGIN`) are queued and go
//! out in one round trip with the next statement that does: a write
//! transaction is four round trips at most, however many rows it writes
//! (`BEGIN` with the replay check, the observation, the next revision, the
//! writes with `COMMIT`). Fewer round trips under the pool row's lock is
//! what lets writers of one product follow each other quickly.
//!
//! Requests on one connection are answered in the order they were sent,
//! so the queue keeps the transaction's order; the first error wins, and
//! the server has then aborted the transaction, so nothing after it counts.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::Poll;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Error, Row, SimpleQueryMessage, Statement};

use crate::backend::BackendError;
use crate::backend::store::pool::Bounded;

/// A parameter a queued statement owns until it is sent.
pub type Param = Box<dyn ToSql + Sync + Send>;

/// Turns a value into a [`Param`]: `params![account, pool.total]`.
pub trait Own {
    fn own(&self) -> Param;
}

impl Own for str {
    fn own(&self) -> Param {
        Box::new(self.to_string())
    }
}

impl Own for String {
    fn own(&self) -> Param {
        Box::new(self.clone())
    }
}

impl Own for i64 {
    fn own(&self) -> Param {
        Box::new(*self)
    }
}

impl Own for i32 {
    fn own(&self) -> Param {
        Box::new(*self)
    }
}

impl Own for Vec<String> {
    fn own(&self) -> Param {
        Box::new(self.clone())
    }
}

impl Own for Option<&str> {
    fn own(&self) -> Param {
        Box::new(self.map(str::to_string))
    }
}

impl Own for Option<String> {
    fn own(&self) -> Param {
        Box::new(self.clone())
    }
}

/// The owned parameters of a statement.
macro_rules! params {
    ($($p:expr),* $(,)?) => {{
        #[allow(unused_imports)]
        use $crate::backend::store::postgres::conn::Own;
        vec![$(($p).own()),*]
    }};
}
pub(crate) use params;

/// One request to the server.
pub enum Request {
    /// SQL text without parameters (`BEGIN`, `COMMIT`, migrations).
    Simple(String),
    /// A prepared statement whose rows are wanted.
    Query(Statement, Vec<Param>),
    /// A prepared statement whose count of rows is wanted.
    Execute(Statement, Vec<Param>),
    /// The place of a request still being made ([`Conn::reserve`]); it
    /// must be filled before the queue goes out.
    Reserved,
    /// Nothing to send (a place given up).
    Nothing,
}

/// What the server answered to one [`Request`].
pub enum Answer {
    Done,
    Rows(Vec<Row>),
    Count(u64),
}

impl Answer {
    pub fn rows(self) -> Vec<Row> {
        match self {
            Answer::Rows(rows) => rows,
            _ => Vec::new(),
        }
    }

    pub fn count(self) -> u64 {
        match self {
            Answer::Count(n) => n,
            _ => 0,
        }
    }
}

/// One connection: its client, the runtime that drives it, the statements
/// prepared on it and the requests queued for its next round trip.
pub struct Conn {
    client: Client,
    runtime: tokio::runtime::Runtime,
    statements: HashMap<String, Statement>,
    queued: Vec<Request>,
    /// Where each request queued under a key is in `queued`.
    keyed: HashMap<Vec<String>, usize>,
    /// Round trips so far (and queues given up): a place in `queued` is
    /// good for the trip it was taken in only.
    trip: u64,
}

impl Conn {
    pub fn new(client: Client, runtime: tokio::runtime::Runtime) -> Conn {
        Conn {
            client,
            runtime,
            statements: HashMap::new(),
            queued: Vec::new(),
            keyed: HashMap::new(),
            trip: 0,
        }
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Runs SQL text (several statements allowed) now, after what is queued.
    pub fn simple_query(&mut self, sql: &str) -> Result<Vec<SimpleQueryMessage>, Error> {
        self.flush()?;
        self.runtime.block_on(self.client.simple_query(sql))
    }

    /// The prepared statement for `sql`, prepared now if it is new. The
    /// queue stays queued: preparing runs nothing.
    pub fn statement(&mut self, sql: &str) -> Result<Statement, Error> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let prepared = self.runtime.block_on(self.client.prepare(sql))?;
        self.statements.insert(sql.to_string(), prepared.clone());
        Ok(prepared)
    }

    /// Queues a request for the next round trip.
    pub fn later(&mut self, request: Request) {
        self.queued.push(request);
    }

    /// Queues a request under `key` (its parts, compared whole): in the
    /// place of the one queued under the same key if that one has not been
    /// sent yet, else last. For a write that only its last value matters
    /// of, within one transaction.
    pub fn later_instead(&mut self, key: Vec<String>, request: Request) {
        match self.keyed.get(&key) {
            Some(&at) => self.queued[at] = request,
            None => {
                self.keyed.insert(key, self.queued.len());
                self.queued.push(request);
            }
        }
    }

    /// Keeps a place in the queue for a request made later, before the
    /// queue goes out ([`Conn::fill`]): the round trip it is for and where.
    pub fn reserve(&mut self) -> (u64, usize) {
        self.queued.push(Request::Reserved);
        (self.trip, self.queued.len() - 1)
    }

    /// Puts `request` in the place `reserve` kept. A place whose round trip
    /// went is left alone: it went filled (`send` makes sure) or was given
    /// up with its transaction.
    pub fn fill(&mut self, (trip, at): (u64, usize), request: Request) {
        if trip == self.trip && at < self.queued.len() {
            self.queued[at] = request;
        }
    }

    /// Forgets what is queued (a transaction given up before it was sent).
    pub fn discard(&mut self) {
        self.queued.clear();
        self.keyed.clear();
        self.trip += 1;
    }

    /// Sends what is queued.
    pub fn flush(&mut self) -> Result<(), Error> {
        if self.queued.is_empty() {
            return Ok(());
        }
        self.send(Vec::new()).map(drop)
    }

    /// Sends what is queued and then `requests`, in one round trip, and
    /// returns the answers to `requests` in order.
    pub fn send(&mut self, requests: Vec<Request>) -> Result<Vec<Answer>, Error> {
        let mut all = std::mem::take(&mut self.queued);
        self.keyed.clear();
        self.trip += 1;
        all.retain(|r| !matches!(r, Request::Nothing));
        assert!(
            !all.iter().any(|r| matches!(r, Request::Reserved)),
            "a place reserved in the queue was not filled before it went out"
        );
        let first = all.len();
        all.extend(requests);
        let client = &self.client;
        let answers = self.runtime.block_on(in_order(
            all.iter()
                .map(|r| Box::pin(ask(client, r)) as Pin<Box<dyn Future<Output = _> + Send + '_>>)
                .collect(),
        ));
        let mut wanted = Vec::with_capacity(answers.len() - first);
        for (i, answer) in answers.into_iter().enumerate() {
            let answer = answer?;
            if i >= first {
                wanted.push(answer);
            }
        }
        Ok(wanted)
    }
}

async fn ask(client: &Client, request: &Request) -> Result<Answer, Error> {
    fn refs(params: &[Param]) -> Vec<&(dyn ToSql + Sync)> {
        params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect()
    }
    match request {
        Request::Simple(sql) => client.batch_execute(sql).await.map(|()| Answer::Done),
        Request::Query(s, params) => client.query(s, &refs(params)).await.map(Answer::Rows),
        Request::Execute(s, params) => client.execute(s, &refs(params)).await.map(Answer::Count),
        Request::Reserved | Request::Nothing => Ok(Answer::Done),
    }
}

/// Polls every future in the order given, each time any of them is woken,
/// until all are done. A tokio-postgres request is written to the
/// connection when its future is first polled, so this sends them in order,
/// before the first answer is awaited: one round trip for all.
async fn in_order<'a, T>(mut futures: Vec<Pin<Box<dyn Future<Output = T> + Send + 'a>>>) -> Vec<T> {
    let mut done: Vec<Option<T>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, d) in futures.iter_mut().zip(done.iter_mut()) {
            if d.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *d = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    done.into_iter().flatten().collect()
}

/// The connections of one process: at most `max` open, idle ones reused,
/// closed ones (a server restart) replaced on the next call.
pub struct Conns {
    pool: Bounded<Conn>,
    /// Opens a new connection (its URL holds credentials, never shown).
    open: Opener,
    /// What the first connection must do before any is used (check and
    /// migrate the schema), when the database was not up at start; done
    /// once, by whichever call connects first.
    setup: Mutex<Option<Setup>>,
}

/// How the pool opens a connection ([`super::connect::connect`] on its URL).
pub type Opener = Box<dyn Fn() -> Result<Conn, BackendError> + Send + Sync>;

/// The first connection's work: see [`Conns::pending`].
pub type Setup = Box<dyn Fn(&mut Conn) -> Result<(), BackendError> + Send>;

impl Conns {
    pub fn new(first: Conn, open: Opener, max: usize) -> Conns {
        Conns {
            pool: Bounded::new(max, Some(first)),
            open,
            setup: Mutex::new(None),
        }
    }

    /// No connection yet (the database is not up): every call tries to
    /// connect, and the first that does runs `setup` on its connection
    /// before anything else may use the database. Until then calls fail as
    /// the connection does (`Unavailable`).
    pub fn pending(open: Opener, max: usize, setup: Setup) -> Conns {
        Conns {
            pool: Bounded::new(max, None),
            open,
            setup: Mutex::new(Some(setup)),
        }
    }

    /// A new connection, set up first when the setup is still to do.
    fn open(&self) -> Result<Conn, BackendError> {
        let mut conn = (self.open)()?;
        let mut setup = self
            .setup
            .lock()
            .map_err(|_| BackendError::Unavailable("store lock poisoned".into()))?;
        if let Some(first) = setup.as_ref() {
            first(&mut conn)?;
            *setup = None;
        }
        Ok(conn)
    }

    /// An idle connection that is still open, or a new one while fewer
    /// than `max` are open; else waits for one to be given back.
    pub fn take(&self) -> Result<Conn, BackendError> {
        self.pool.take(|conn| !conn.is_closed(), || self.open())
    }

    /// Gives a connection back: kept for the next call when `healthy`.
    pub fn give(&self, mut conn: Conn, healthy: bool) {
        let keep = healthy && !conn.is_closed();
        if !keep {
            conn.discard();
        }
        self.pool.give(conn, keep);
    }

    /// Takes every idle connection (to close them off an async thread).
    pub fn drain(&self) -> Vec<Conn> {
        self.pool.drain()
    }
}
