//! The asynchronous-statement double the cloud warehouse doubles share (Snowflake's SQL API,
//! Databricks' Statement Execution API, BigQuery's jobs), on [`HttpDouble`] and its request
//! log and scripted failures.
//!
//! It keeps what the three services have in common: results registered per statement text,
//! their rows fixed or made on demand and cut into parts (partitions, chunks, pages);
//! statements that answer "running" for a scripted number of polls, or until cancelled; the
//! ids cancelled; the scripted expiry of tokens and throttling of result fetches. Each
//! service's double configures it with its result type, what it keeps per statement, its own
//! state (tokens, keys) and a handler for its routes and wire format.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::http_server::{Behaviour, HttpDouble, RecordedRequest, Reply};

/// Makes row `i` of a generated result.
pub type RowMaker<R> = Arc<dyn Fn(u64) -> R + Send + Sync>;

/// The rows of a result, fixed or made on demand (so a million rows cost no memory in the
/// double), cut into parts of `part_rows` rows.
#[derive(Clone)]
pub struct ResultRows<R> {
    rows: Rows<R>,
    /// Rows per part (partition, chunk or page).
    pub part_rows: usize,
}

#[derive(Clone)]
enum Rows<R> {
    Fixed(Arc<Vec<R>>),
    Made(u64, RowMaker<R>),
}

impl<R: Clone> ResultRows<R> {
    /// These rows, in parts of `part_rows`.
    pub fn fixed(rows: Vec<R>, part_rows: usize) -> Self {
        ResultRows {
            rows: Rows::Fixed(Arc::new(rows)),
            part_rows: part_rows.max(1),
        }
    }

    /// `count` rows made by `make`, in parts of `part_rows`.
    pub fn made(count: u64, make: RowMaker<R>, part_rows: usize) -> Self {
        ResultRows {
            rows: Rows::Made(count, make),
            part_rows: part_rows.max(1),
        }
    }

    /// The number of rows.
    pub fn len(&self) -> u64 {
        match &self.rows {
            Rows::Fixed(rows) => rows.len() as u64,
            Rows::Made(count, _) => *count,
        }
    }

    /// The number of parts; an empty result has one, empty.
    pub fn parts(&self) -> usize {
        (self.len() as usize).div_ceil(self.part_rows).max(1)
    }

    /// The first row of part `index` and the row after its last.
    pub fn part_range(&self, index: usize) -> (u64, u64) {
        let start = (index as u64).saturating_mul(self.part_rows as u64);
        (
            start.min(self.len()),
            start.saturating_add(self.part_rows as u64).min(self.len()),
        )
    }

    /// The rows of part `index`.
    pub fn part(&self, index: usize) -> Vec<R> {
        let (start, end) = self.part_range(index);
        self.range(start, end)
    }

    /// Rows `start..end`, cut to the result.
    pub fn range(&self, start: u64, end: u64) -> Vec<R> {
        let end = end.min(self.len());
        let start = start.min(end);
        match &self.rows {
            Rows::Fixed(rows) => rows[start as usize..end as usize].to_vec(),
            Rows::Made(_, make) => (start..end).map(|i| make(i)).collect(),
        }
    }
}

/// What a statement ends with.
#[derive(Clone)]
pub enum Outcome<T> {
    /// A result.
    Rows(T),
    /// An error, with the service's code and message.
    Fail { code: String, message: String },
}

/// One submitted statement.
pub struct Statement<T, S> {
    /// How it ends.
    pub outcome: Outcome<T>,
    /// What the service keeps about it besides (its disposition, its byte limit).
    pub details: S,
    polls_left: usize,
    cancelled: bool,
    forever: bool,
}

/// Where a statement stands at a poll.
pub enum Poll<T> {
    /// No statement has this id.
    Unknown,
    /// It was cancelled.
    Cancelled,
    /// It is still running.
    Running,
    /// It ended.
    Done(Outcome<T>),
}

/// The statements of one double and the scripts that apply to them.
pub struct Statements<T, S> {
    results: BTreeMap<String, Outcome<T>>,
    statements: BTreeMap<String, Statement<T, S>>,
    running_polls: usize,
    run_forever: bool,
    expire_next: usize,
    throttle_next: usize,
    cancelled: Vec<String>,
    submitted: usize,
}

impl<T: Clone, S> Statements<T, S> {
    fn new() -> Self {
        Statements {
            results: BTreeMap::new(),
            statements: BTreeMap::new(),
            running_polls: 1,
            run_forever: false,
            expire_next: 0,
            throttle_next: 0,
            cancelled: Vec::new(),
            submitted: 0,
        }
    }

    /// How the statement `text` ends, when the test registered it.
    pub fn registered(&self, text: &str) -> Option<Outcome<T>> {
        self.results.get(text).cloned()
    }

    /// Records a submitted statement and returns its number (1, 2, …), which the service
    /// turns into its id with [`Statements::insert`].
    pub fn next_number(&mut self) -> usize {
        self.submitted += 1;
        self.submitted
    }

    /// Starts statement `id`: it runs for the scripted number of polls, or forever.
    pub fn insert(&mut self, id: String, outcome: Outcome<T>, details: S) {
        let statement = Statement {
            outcome,
            details,
            polls_left: self.running_polls,
            cancelled: false,
            forever: self.run_forever,
        };
        self.statements.insert(id, statement);
    }

    /// A poll of statement `id`: each poll while it runs uses one of its running polls.
    pub fn poll(&mut self, id: &str) -> Poll<T> {
        let Some(statement) = self.statements.get_mut(id) else {
            return Poll::Unknown;
        };
        if statement.cancelled {
            return Poll::Cancelled;
        }
        if statement.forever || statement.polls_left > 0 {
            statement.polls_left = statement.polls_left.saturating_sub(1);
            return Poll::Running;
        }
        Poll::Done(statement.outcome.clone())
    }

    /// Statement `id`, without polling it (a fetch of a part of its result).
    pub fn get(&self, id: &str) -> Option<&Statement<T, S>> {
        self.statements.get(id)
    }

    /// Cancels statement `id`; false when there is none.
    pub fn cancel(&mut self, id: &str) -> bool {
        match self.statements.get_mut(id) {
            Some(statement) => {
                statement.cancelled = true;
                self.cancelled.push(id.to_owned());
                true
            }
            None => false,
        }
    }

    /// True when this request is one of the scripted token expiries.
    pub fn take_expiry(&mut self) -> bool {
        take(&mut self.expire_next)
    }

    /// True when this result fetch is one of the scripted throttles.
    pub fn take_throttle(&mut self) -> bool {
        take(&mut self.throttle_next)
    }
}

fn take(counter: &mut usize) -> bool {
    if *counter > 0 {
        *counter -= 1;
        true
    } else {
        false
    }
}

/// Everything a handler sees: the statements, the service's own state, and the double's
/// base URL (for links it hands out).
pub struct Service<T, S, X> {
    /// The statements.
    pub statements: Statements<T, S>,
    /// The service's own state.
    pub own: X,
    /// The double's base URL.
    pub base: String,
}

/// Locks a double's state, whatever a panicking test left in it.
pub fn lock<T, S, X>(state: &Mutex<Service<T, S, X>>) -> MutexGuard<'_, Service<T, S, X>> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Answers one request of a service's API. It gets the state's mutex rather than a guard, so
/// it can let go of the lock while it builds a large answer.
pub type Handler<T, S, X> = fn(&Mutex<Service<T, S, X>>, &RecordedRequest) -> Reply;

/// A running asynchronous-statement double.
pub struct StatementDouble<T, S, X> {
    /// Its base URL: the endpoint override the tests give the source.
    pub url: String,
    http: HttpDouble,
    state: Arc<Mutex<Service<T, S, X>>>,
}

impl<T, S, X> StatementDouble<T, S, X>
where
    T: Clone + Send + 'static,
    S: Send + 'static,
    X: Send + 'static,
{
    /// Starts a double answering with `handler` once `behaviour`'s script is used up.
    pub async fn start(behaviour: Behaviour, own: X, handler: Handler<T, S, X>) -> Self {
        let state = Arc::new(Mutex::new(Service {
            statements: Statements::new(),
            own,
            base: String::new(),
        }));
        let handler_state = state.clone();
        let http =
            HttpDouble::start(behaviour.handler(move |request| handler(&handler_state, request))).await;
        lock(&state).base = http.url.clone();
        StatementDouble {
            url: http.url.clone(),
            http,
            state,
        }
    }

    /// The state, locked (for a service's own settings).
    pub fn state(&self) -> MutexGuard<'_, Service<T, S, X>> {
        lock(&self.state)
    }

    /// Serves `result` for the statement `text`.
    pub fn serve(&self, text: &str, result: T) {
        self.state()
            .statements
            .results
            .insert(text.to_owned(), Outcome::Rows(result));
    }

    /// Fails the statement `text` with this error code and message.
    pub fn fail(&self, text: &str, code: &str, message: &str) {
        self.state().statements.results.insert(
            text.to_owned(),
            Outcome::Fail {
                code: code.to_owned(),
                message: message.to_owned(),
            },
        );
    }

    /// Answers "running" to this many polls before a statement ends.
    pub fn running_polls(&self, polls: usize) {
        self.state().statements.running_polls = polls;
    }

    /// Statements never end (until cancelled).
    pub fn run_forever(&self) {
        self.state().statements.run_forever = true;
    }

    /// The next `times` authenticated requests are refused as carrying an expired token.
    pub fn expire_tokens(&self, times: usize) {
        self.state().statements.expire_next = times;
    }

    /// The next `times` result fetches are throttled.
    pub fn throttle_fetches(&self, times: usize) {
        self.state().statements.throttle_next = times;
    }

    /// The ids of the statements cancelled so far.
    pub fn cancelled(&self) -> Vec<String> {
        self.state().statements.cancelled.clone()
    }

    /// Every request received.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.http.requests()
    }
}
