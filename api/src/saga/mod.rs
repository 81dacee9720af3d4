//! Sagas: a composite change (a VM create or delete, next a database or a cluster) as a
//! list of named steps, each with its undo, whose progress is recorded in the store
//! before each step runs (Oxide's steno has the same shape).
//!
//! ```text
//!  begin ──▶ record {steps, done: 0, running} ──▶ step 0 ─▶ record {done: 1} ─▶ step 1 ─▶ …
//!                                                   │ fails                        ─▶ record {succeeded}
//!                                                   ▼
//!            record {unwinding, failed_step} ─▶ undo of the failed step, then of every
//!            earlier one, last first ─▶ record {undone}
//! ```
//!
//! A step's data lives in the saga's context (`C`, serialized into the record with the
//! progress), so a saga can be resumed or undone by another process from the store
//! alone. Undos must be idempotent and must tolerate a step that ran only in part (the
//! failed step's own undo runs too, and after a crash the step in flight may have done
//! anything from nothing to all of its work).
//!
//! After a crash ([`recover`]) a saga is undone, unless it had passed its definition's
//! `pivot`: from there on the change is whole and the remaining steps run forwards (a
//! VM create whose VM is recorded ready is started, not removed; a delete is finished).
//! A saga whose undo failed, or a forward-only one whose step failed, is left owned by
//! no process; the reconciler takes it up again at its next pass.
//!
//! Steps fail with the error of the resource the saga changes (`E`: `VmError` for a VM's
//! sagas); the engine's own failures ([`SagaError`]: its record could not be written)
//! become one too. The saga's record keeps the error's message; its operation, the
//! public error the resource's error converts into, as a handler would answer it.
//!
//! Tests inject faults with `HEARTH_SAGA_FAULT=<saga>/<step>=fail|crash`: after that
//! step ran and was recorded, `fail` makes it fail (the saga unwinds) and `crash` ends
//! the process at once (as kill -9 would). Nothing else reads it.

pub mod error;

use std::sync::OnceLock;

use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;
use socket_http::ApiError;

use crate::model::Operation;
use crate::model::{saga_key as key, SagaRecord, SagaState};
use crate::saga::error::SagaError;
use crate::state::AppState;
use crate::store;

/// What a saga's steps fail with: the error of the resource it changes. The engine makes
/// its own failures into one (`From<SagaError>`), and its operation records the public
/// error the resource's one conversion (`From<&E> for ApiError`) makes of it.
pub trait StepError: From<SagaError> + std::fmt::Display + Send + 'static {
    /// The error as the saga's operation shows it.
    fn public(&self) -> ApiError;
}

impl<E> StepError for E
where
    E: From<SagaError> + std::fmt::Display + Send + 'static,
    for<'a> ApiError: From<&'a E>,
{
    fn public(&self) -> ApiError {
        ApiError::from(self)
    }
}

/// One step of a saga whose steps fail with `E`.
pub struct Step<C, E> {
    pub name: &'static str,
    /// What the operation says while it runs ("cloning the root disk").
    pub doing: &'static str,
    /// Does the step's work; may change the context (what later steps and undos read).
    pub run: for<'a> fn(&'a AppState, &'a mut C) -> BoxFuture<'a, Result<(), E>>,
    /// Undoes it; must succeed when there is nothing to undo.
    pub undo: for<'a> fn(&'a AppState, &'a C) -> BoxFuture<'a, Result<(), E>>,
}

/// A kind of saga: its steps, in order.
pub struct SagaDef<C: 'static, E: 'static> {
    /// The operation kind it carries out, e.g. `vm.create`.
    pub kind: &'static str,
    pub steps: &'static [Step<C, E>],
    /// After a crash, a saga that had finished this many steps (or more) is resumed
    /// forwards instead of undone. `steps.len()`: always undone. 0: a forward-only
    /// saga (a delete), always resumed, and a step that fails leaves it recorded for the
    /// reconciler to resume rather than undoing anything.
    pub pivot: usize,
}

/// A fault a test asked for after one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Fail,
    Crash,
}

fn fault_after(kind: &str, step: &str) -> Option<Fault> {
    static FAULT: OnceLock<Option<(String, String, Fault)>> = OnceLock::new();
    let parsed = FAULT.get_or_init(|| {
        let v = std::env::var("HEARTH_SAGA_FAULT").ok()?;
        let (at, what) = v.split_once('=')?;
        let (saga, step) = at.split_once('/')?;
        let fault = match what {
            "fail" => Fault::Fail,
            "crash" => Fault::Crash,
            _ => return None,
        };
        tracing::warn!(
            saga,
            step,
            ?fault,
            "HEARTH_SAGA_FAULT: a fault will be injected (tests only)"
        );
        Some((saga.to_string(), step.to_string(), fault))
    });
    parsed
        .as_ref()
        .filter(|(s, t, _)| s == kind && t == step)
        .map(|(_, _, f)| *f)
}

/// A saga being run by this process.
pub struct Saga<C: 'static, E: 'static> {
    def: &'static SagaDef<C, E>,
    record: SagaRecord,
    pub context: C,
    /// The operation that shows its progress, once there is one.
    operation: Option<String>,
}

impl<C: Serialize + DeserializeOwned + Send + Sync + 'static, E: StepError> Saga<C, E> {
    /// Records a new saga (nothing has run yet).
    pub async fn begin(state: &AppState, def: &'static SagaDef<C, E>, id: &str, context: C) -> Result<Self, SagaError> {
        let record = SagaRecord {
            id: id.to_string(),
            kind: def.kind.to_string(),
            owner: state.instance.clone(),
            steps: def.steps.iter().map(|s| s.name.to_string()).collect(),
            done: 0,
            state: SagaState::Running,
            failed_step: None,
            error: None,
            doing: def.steps.first().map_or("", |s| s.doing).to_string(),
            // Filled in by save().
            context: serde_json::Value::Null,
        };
        let mut saga = Self {
            def,
            record,
            context,
            operation: None,
        };
        saga.save(state).await?;
        Ok(saga)
    }

    /// Takes over a saga another process left (see [`recover`]).
    fn adopt(state: &AppState, def: &'static SagaDef<C, E>, mut record: SagaRecord) -> Result<Self, SagaError> {
        let context = serde_json::from_value(record.context.clone()).map_err(|source| SagaError::Unreadable {
            id: record.id.clone(),
            source,
        })?;
        record.owner = state.instance.clone();
        Ok(Self {
            def,
            operation: Some(record.id.clone()),
            record,
            context,
        })
    }

    pub fn id(&self) -> &str {
        &self.record.id
    }

    /// Records its operation (under the saga's own id), showing its steps; from then on
    /// the operation reads its progress from the saga's record (see
    /// [`crate::operations::record::Operations::get`]) and gets its end from
    /// [`finish`](Self::finish).
    pub async fn start_operation(
        &mut self,
        state: &AppState,
        project: &str,
        target_kind: &str,
        target_id: &str,
    ) -> Result<Operation, SagaError> {
        let op = state
            .ops
            .start_saga(
                &self.record.id,
                project,
                self.def.kind,
                target_kind,
                target_id,
                self.record.progress(),
            )
            .await?;
        self.operation = Some(self.record.id.clone());
        Ok(op)
    }

    /// What it is doing now; written with the next record.
    fn show(&mut self, doing: &str) {
        self.record.doing = doing.to_string();
    }

    async fn save(&mut self, state: &AppState) -> Result<(), SagaError> {
        self.record.context = serde_json::to_value(&self.context).map_err(SagaError::Encode)?;
        // Written after every step: the relaxed kind (see StateStore::put_relaxed).
        state
            .store
            .put_relaxed(&key(&self.record.id), store::encode(&self.record))
            .await?;
        Ok(())
    }

    /// Runs the steps up to (not including) the one named `stop`, or all of them. On a
    /// failure every step so far is undone, the last first, and the step's error is
    /// returned.
    pub async fn run_until(&mut self, state: &AppState, stop: Option<&str>) -> Result<(), E> {
        while self.record.done < self.def.steps.len() {
            let step = &self.def.steps[self.record.done];
            if stop == Some(step.name) {
                return Ok(());
            }
            let mut result = (step.run)(state, &mut self.context).await;
            if result.is_ok() {
                self.record.done += 1;
                let next = self.def.steps.get(self.record.done);
                self.show(next.map_or("finishing", |s| s.doing));
                if let Err(e) = self.save(state).await {
                    // Not recorded: undone with the rest, as if it had failed.
                    self.record.done -= 1;
                    result = Err(e.into());
                }
            }
            if result.is_ok() {
                match fault_after(self.def.kind, step.name) {
                    Some(Fault::Crash) => {
                        tracing::error!(saga = %self.record.id, step = step.name, "HEARTH_SAGA_FAULT: crashing");
                        std::process::abort();
                    }
                    Some(Fault::Fail) => {
                        // Recorded as done: its own undo runs with the earlier ones.
                        self.record.done -= 1;
                        result = Err(SagaError::Injected(step.name).into());
                    }
                    None => {}
                }
            }
            if let Err(e) = result {
                self.record.failed_step = Some(step.name.to_string());
                self.record.error = Some(e.to_string());
                if self.def.pivot == 0 {
                    // Forward-only (a delete): nothing to undo; the record stays, owned
                    // by no process, for the reconciler's next pass to take up again.
                    self.record.owner.clear();
                    self.show(&format!("{} failed", step.name));
                    let _ = self.save(state).await;
                } else {
                    self.unwind(state).await;
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Undoes every step that ran, when the change cannot go on for a reason outside
    /// the steps (its operation could not be recorded).
    pub async fn abandon(&mut self, state: &AppState, error: &impl std::fmt::Display) {
        self.record.error = Some(error.to_string());
        // Nothing is in flight: unwind() would undo one step more than ran.
        if self.record.done == 0 {
            self.record.state = SagaState::Undone;
            let _ = state.store.delete(&key(&self.record.id)).await;
            return;
        }
        self.record.done -= 1;
        self.unwind(state).await;
    }

    /// Runs the remaining steps and marks the saga succeeded (its record is removed; the
    /// operation keeps what it showed).
    pub async fn finish(mut self, state: &AppState) -> Result<C, E> {
        if let Err(e) = self.run_until(state, None).await {
            if let Some(op) = &self.operation {
                state.ops.end_saga(op, Some(&e.public()), self.record.progress()).await;
            }
            return Err(e);
        }
        self.record.state = SagaState::Succeeded;
        self.show("done");
        if let Some(op) = &self.operation {
            state.ops.end_saga(op, None, self.record.progress()).await;
        }
        if let Err(e) = state.store.delete(&key(&self.record.id)).await {
            tracing::warn!(saga = %self.record.id, "cannot remove the finished saga's record: {e}");
        }
        Ok(self.context)
    }

    /// Undoes the step in flight (it may have run in part) and every earlier one, last
    /// first. An undo that fails does not stop the others (each is idempotent and the
    /// reconciler's sweep takes what is named after the resource); the saga is then left
    /// `unwinding`, owned by no process, for the reconciler to undo again whole.
    async fn unwind(&mut self, state: &AppState) {
        self.record.state = SagaState::Unwinding;
        // The step in flight (or the failed one) is undone too.
        let mut left = (self.record.done + 1).min(self.def.steps.len());
        let to_undo = left;
        self.record.done = left;
        let _ = self.save(state).await;
        let mut failed = Vec::new();
        while left > 0 {
            let step = &self.def.steps[left - 1];
            self.show(&format!("undoing {}", step.name));
            if let Err(e) = (step.undo)(state, &self.context).await {
                tracing::error!(saga = %self.record.id, step = step.name, "cannot undo: {e}");
                failed.push(format!("undoing {} failed: {e}", step.name));
            }
            left -= 1;
            if failed.is_empty() {
                self.record.done = left;
                let _ = self.save(state).await;
            }
        }
        if !failed.is_empty() {
            self.record.error = Some(format!(
                "{}; {}",
                self.record.error.clone().unwrap_or_default(),
                failed.join("; ")
            ));
            self.record.done = to_undo;
            // Left to the reconciler's next pass (no process runs it any more).
            self.record.owner.clear();
            let _ = self.save(state).await;
            return;
        }
        self.record.state = SagaState::Undone;
        self.show("undone");
        let _ = state.store.delete(&key(&self.record.id)).await;
    }
}

/// What happened to a saga another process left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovered {
    /// Its remaining steps ran: the change is whole.
    Finished,
    /// Every step it had made was undone.
    Undone,
    /// It could not be settled now (a daemon refused an undo); the next pass tries again.
    Stuck(String),
    /// Taken over by this process and finishing in a task (see [`recover_in_background`]).
    Resumed,
}

/// Resumes or undoes a saga left by a process that is gone, per its definition's pivot.
pub async fn recover<C: Serialize + DeserializeOwned + Send + Sync + 'static, E: StepError>(
    state: &AppState,
    def: &'static SagaDef<C, E>,
    record: SagaRecord,
) -> Recovered {
    let forwards = record.state == SagaState::Running && record.done >= def.pivot;
    let mut saga = match Saga::adopt(state, def, record) {
        Ok(s) => s,
        Err(e) => return Recovered::Stuck(e.to_string()),
    };
    if forwards {
        tracing::info!(saga = %saga.record.id, kind = def.kind, done = saga.record.done, "resuming a saga past its pivot");
        return match saga.finish(state).await {
            Ok(_) => Recovered::Finished,
            Err(e) => Recovered::Stuck(e.to_string()),
        };
    }
    tracing::info!(saga = %saga.record.id, kind = def.kind, done = saga.record.done, "undoing a saga cut short");
    if saga.record.state == SagaState::Running {
        saga.record.failed_step = saga.record.steps.get(saga.record.done).cloned();
        saga.record.error = Some("the api stopped while the saga ran".into());
    } else {
        // Already unwinding: `done` counts the steps still to undo, the one in flight
        // included; unwind() adds that one again.
        saga.record.done = saga.record.done.saturating_sub(1);
    }
    saga.unwind(state).await;
    match saga.record.state {
        SagaState::Undone => Recovered::Undone,
        _ => Recovered::Stuck(saga.record.error.clone().unwrap_or_default()),
    }
}

/// [`recover`] for a saga whose remaining steps may take long (an import following a
/// download): one past its pivot is taken over (its record names this process from
/// now on, so no later pass takes it up again) and finished in a task, so the api
/// serves meanwhile; one before its pivot is undone now.
pub async fn recover_in_background<C: Serialize + DeserializeOwned + Send + Sync + 'static, E: StepError>(
    state: &std::sync::Arc<AppState>,
    def: &'static SagaDef<C, E>,
    record: SagaRecord,
) -> Recovered {
    let forwards = record.state == SagaState::Running && record.done >= def.pivot;
    if !forwards {
        return recover(state, def, record).await;
    }
    let mut saga = match Saga::adopt(state, def, record) {
        Ok(s) => s,
        Err(e) => return Recovered::Stuck(e.to_string()),
    };
    if let Err(e) = saga.save(state).await {
        return Recovered::Stuck(e.to_string());
    }
    tracing::info!(saga = %saga.record.id, kind = def.kind, done = saga.record.done, "resuming a saga past its pivot in a task");
    let task_state = state.clone();
    tokio::spawn(async move {
        let _ = saga.finish(&task_state).await;
    });
    Recovered::Resumed
}

/// Sagas in the store that no live process of this api runs: those of earlier
/// processes (at start every saga is one), and those this one gave up on (an undo that
/// failed, a forward-only step that failed), which no process owns.
///
/// With several hosts, the sagas of other hosts' live apis (those holding their host's
/// lease) are theirs: left alone.
pub async fn left_over(state: &AppState) -> Result<Vec<SagaRecord>, store::StoreError> {
    let others = crate::hosts::record::live_instances(state.store.as_ref(), &state.config.host.name).await?;
    Ok(store::list_json::<SagaRecord>(state.store.as_ref(), "sagas/")
        .await?
        .into_iter()
        .map(|(r, _)| r)
        .filter(|r| r.owner != state.instance && !others.contains(&r.owner))
        .filter(|r| matches!(r.state, SagaState::Running | SagaState::Unwinding))
        .collect())
}
