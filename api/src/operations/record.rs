//! Long-running operations: recorded in the store before work starts, updated as it
//! goes, and long-polled by clients (`?wait=SECONDS`).
//! Their counters and durations for `/metrics` are kept here too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use socket_http::{ApiError, ErrorBody};
use tokio::sync::watch;

use crate::model::{saga_key, Operation, OperationStatus, SagaProgress, SagaRecord};
use crate::store::{self, StateStore, StoreError};

/// Creates, updates and waits for operations.
pub struct Operations {
    store: Arc<dyn StateStore>,
    /// This api process's identity, recorded as the runner of what it starts.
    instance: String,
    waiters: Mutex<HashMap<String, watch::Sender<()>>>,
    events: Arc<crate::events::bus::Events>,
    metrics: crate::operations::record::OperationMetrics,
}

/// What a VM operation's success means for the VM, as a `vm` event says it.
fn vm_change(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "vm.create" => "created",
        "vm.delete" => "deleted",
        "vm.start" => "started",
        "vm.stop" => "stopped",
        "vm.reboot" => "rebooted",
        "vm.pause" => "paused",
        "vm.resume" => "resumed",
        _ => return None,
    })
}

fn key(id: &str) -> String {
    format!("operations/{id}")
}

impl Operations {
    pub fn new(store: Arc<dyn StateStore>, events: Arc<crate::events::bus::Events>, instance: String) -> Self {
        Self {
            store,
            instance,
            waiters: Mutex::new(HashMap::new()),
            events,
            metrics: Default::default(),
        }
    }

    pub fn metrics(&self) -> &crate::operations::record::OperationMetrics {
        &self.metrics
    }

    fn emit(&self, op: &Operation) {
        let data = serde_json::to_value(op).unwrap_or_default();
        self.events.emit("operation", &op.project, data);
        if op.status == OperationStatus::Succeeded && op.target_kind == "vm" {
            if let Some(change) = vm_change(&op.kind) {
                self.events.emit(
                    "vm",
                    &op.project,
                    serde_json::json!({"id": op.target_id, "change": change, "operation": op.id}),
                );
            }
        }
    }

    /// Records a new running operation.
    pub async fn start(
        &self,
        project: &str,
        kind: &str,
        target_kind: &str,
        target_id: &str,
    ) -> Result<Operation, StoreError> {
        self.start_with(
            &uuid::Uuid::new_v4().to_string(),
            project,
            kind,
            target_kind,
            target_id,
            None,
        )
        .await
    }

    /// Records the operation a saga carries out (one id for both). While it runs, its
    /// progress is read from the saga's record ([`get`](Self::get)), so the saga's steps
    /// cost no write of the operation; [`end_saga`](Self::end_saga) records its end.
    pub async fn start_saga(
        &self,
        id: &str,
        project: &str,
        kind: &str,
        target_kind: &str,
        target_id: &str,
        saga: SagaProgress,
    ) -> Result<Operation, StoreError> {
        self.start_with(id, project, kind, target_kind, target_id, Some(saga))
            .await
    }

    /// The end of a saga's operation: succeeded, or failed with `error` (an operation
    /// that ended already is left alone).
    pub async fn end_saga(&self, id: &str, error: Option<&ApiError>, saga: SagaProgress) {
        if let Some(e) = error {
            tracing::warn!(operation = id, "operation failed: {}", e.body.message);
        }
        // An operation that already ended stays as it ended (a delete that failed and
        // that the reconciler finished later).
        // (Read as stored: the saga's progress need not be merged in for this.)
        let stored = store::get_json::<Operation>(self.store.as_ref(), &key(id)).await;
        if stored.is_ok_and(|op| op.is_some_and(|(op, _)| op.status != OperationStatus::Running)) {
            return;
        }
        self.update(id, |op| {
            op.saga = Some(saga);
            match error {
                None => {
                    op.status = OperationStatus::Succeeded;
                    op.progress = "done".into();
                }
                Some(e) => {
                    op.status = OperationStatus::Failed;
                    op.progress = "failed".into();
                    op.error = Some(e.body.clone());
                }
            }
        })
        .await;
    }

    async fn start_with(
        &self,
        id: &str,
        project: &str,
        kind: &str,
        target_kind: &str,
        target_id: &str,
        saga: Option<SagaProgress>,
    ) -> Result<Operation, StoreError> {
        let now = vmm_manager::spec::now_ms();
        let op = Operation {
            id: id.to_string(),
            project: project.to_string(),
            kind: kind.to_string(),
            target_kind: target_kind.to_string(),
            target_id: target_id.to_string(),
            status: OperationStatus::Running,
            progress: "accepted".into(),
            progress_detail: None,
            error: None,
            saga,
            created_at_ms: now,
            updated_at_ms: now,
            runner: Some(self.instance.clone()),
        };
        self.store.put(&key(&op.id), store::encode(&op)).await?;
        self.emit(&op);
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(op.id.clone(), watch::channel(()).0);
        Ok(op)
    }

    async fn update(&self, id: &str, f: impl FnOnce(&mut Operation)) {
        let Ok(Some((mut op, _))) = store::get_json::<Operation>(self.store.as_ref(), &key(id)).await else {
            return;
        };
        f(&mut op);
        op.updated_at_ms = vmm_manager::spec::now_ms();
        if let Err(e) = self.store.put(&key(id), store::encode(&op)).await {
            tracing::error!(operation = id, "cannot record operation progress: {e}");
        }
        self.emit(&op);
        let finished = op.status != OperationStatus::Running;
        if finished {
            let status = if op.status == OperationStatus::Succeeded {
                "succeeded"
            } else {
                "failed"
            };
            let secs = op.updated_at_ms.saturating_sub(op.created_at_ms) as f64 / 1000.0;
            self.metrics.finished(&op.kind, status, secs);
        }
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = waiters.get(id) {
            tx.send_replace(());
        }
        if finished {
            waiters.remove(id);
        }
    }

    pub async fn progress(&self, id: &str, step: &str) {
        self.update(id, |op| op.progress = step.to_string()).await;
    }

    /// Progress with byte counts (imports).
    pub async fn progress_detail(&self, id: &str, step: &str, detail: crate::model::ProgressDetail) {
        self.update(id, |op| {
            op.progress = step.to_string();
            op.progress_detail = Some(detail);
        })
        .await;
    }

    pub async fn succeed(&self, id: &str) {
        self.succeed_saying(id, "done").await;
    }

    /// Succeeds with `outcome` as its last progress (what a drain moved and left).
    pub async fn succeed_saying(&self, id: &str, outcome: &str) {
        self.update(id, |op| {
            op.status = OperationStatus::Succeeded;
            op.progress = outcome.into();
        })
        .await;
    }

    pub async fn fail(&self, id: &str, error: &ApiError) {
        let body: ErrorBody = error.body.clone();
        tracing::warn!(operation = id, "operation failed: {}", body.message);
        self.update(id, |op| {
            op.status = OperationStatus::Failed;
            op.progress = "failed".into();
            op.error = Some(body);
        })
        .await;
    }

    pub async fn get(&self, id: &str) -> Result<Operation, ApiError> {
        let op = store::get_json::<Operation>(self.store.as_ref(), &key(id))
            .await?
            .map(|(op, _)| op)
            .ok_or_else(|| ApiError::not_found(format!("operation {id} does not exist")))?;
        self.with_saga_progress(op).await
    }

    /// A running saga's operation shows what its record says now.
    async fn with_saga_progress(&self, mut op: Operation) -> Result<Operation, ApiError> {
        if op.status == OperationStatus::Running && op.saga.is_some() {
            if let Some((saga, _)) = store::get_json::<SagaRecord>(self.store.as_ref(), &saga_key(&op.id)).await? {
                // A step that moves data (an import) says its own phase with its bytes.
                if op.progress_detail.is_none() {
                    op.progress = saga.doing.clone();
                }
                op.saga = Some(saga.progress());
            }
        }
        Ok(op)
    }

    /// Returns the operation once it has finished, or after `wait`, whichever is first.
    pub async fn wait(&self, id: &str, wait: Duration) -> Result<Operation, ApiError> {
        let rx = self
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|tx| tx.subscribe());
        let deadline = tokio::time::Instant::now() + wait;
        let op = self.get(id).await?;
        let Some(mut rx) = rx else { return Ok(op) };
        let mut op = op;
        while op.status == OperationStatus::Running {
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => op = self.get(id).await?,
                // Sender gone: the operation finished and was unregistered.
                Ok(Err(_)) => return self.get(id).await,
                Err(_) => break,
            }
        }
        Ok(op)
    }

    pub async fn list(&self) -> Result<Vec<Operation>, ApiError> {
        let mut ops: Vec<Operation> = store::list_json(self.store.as_ref(), "operations/")
            .await?
            .into_iter()
            .map(|(o, _)| o)
            .collect();
        for op in ops.iter_mut().filter(|o| o.status == OperationStatus::Running) {
            *op = self.with_saga_progress(op.clone()).await?;
        }
        ops.sort_by_key(|o| std::cmp::Reverse(o.created_at_ms));
        Ok(ops)
    }
}

pub(crate) type Labels = Vec<(String, String)>;

pub(crate) fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// What the api counts as it runs.
pub struct OperationMetrics {
    pub(crate) finished: Family<Labels, Counter>,
    pub(crate) duration: Family<Labels, Histogram>,
}

impl Default for OperationMetrics {
    fn default() -> Self {
        OperationMetrics {
            finished: Family::default(),
            duration: Family::new_with_constructor(|| {
                // 10 ms … ~80 s: VM actions take seconds under TCG, imports minutes.
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    0.01, 2.0, 14,
                ))
            }),
        }
    }
}

impl OperationMetrics {
    /// Records a finished operation.
    pub fn finished(&self, kind: &str, status: &str, seconds: f64) {
        self.finished
            .get_or_create(&labels(&[("kind", kind), ("status", status)]))
            .inc();
        self.duration.get_or_create(&labels(&[("kind", kind)])).observe(seconds);
    }
}
