//! Operations (long work the api answers `202` for) and the sagas behind composite ones.

use serde::{Deserialize, Serialize};

use super::default_project;
use super::Vm;

/// Status of a long-running operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OperationStatus {
    Running,
    Succeeded,
    Failed,
}

/// A long-running mutation (`202 Accepted` returns one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Operation {
    pub id: String,
    /// The project whose resource the operation works on.
    #[serde(default = "default_project")]
    pub project: String,
    /// What it does, e.g. `vm.create`, `vm.stop`.
    pub kind: String,
    pub target_kind: String,
    pub target_id: String,
    pub status: OperationStatus,
    /// Human description of the current step.
    #[serde(default)]
    pub progress: String,
    /// Byte counts for operations that move data (image imports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_detail: Option<ProgressDetail>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<socket_http::ErrorBody>,
    /// The steps of a composite change (VM create, delete) and how far it got.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saga: Option<SagaProgress>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// The api process running it (an opaque id): with several hosts, another api's
    /// restart leaves alone what a live api runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
}

/// Where a saga is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SagaState {
    Running,
    Unwinding,
    Succeeded,
    Undone,
}

/// What an operation shows of its saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SagaProgress {
    /// The steps, in order.
    pub steps: Vec<String>,
    /// How many have finished (while undoing: how many are still to undo).
    pub done: usize,
    pub state: SagaState,
    /// The step that failed, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<String>,
}

/// A saga as the store keeps it (`sagas/<operation id>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SagaRecord {
    pub id: String,
    pub kind: String,
    /// The api process running it (see [`AppState::instance`]).
    pub owner: String,
    pub steps: Vec<String>,
    /// Steps finished (while unwinding: steps still to undo).
    pub done: usize,
    pub state: SagaState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What it is doing now ("cloning the root disk"): its operation's progress.
    #[serde(default)]
    pub doing: String,
    pub context: serde_json::Value,
}

impl SagaRecord {
    pub fn progress(&self) -> SagaProgress {
        SagaProgress {
            steps: self.steps.clone(),
            done: self.done,
            state: self.state,
            failed_step: self.failed_step.clone(),
        }
    }
}

pub fn saga_key(id: &str) -> String {
    format!("sagas/{id}")
}

/// How far an operation that moves data is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProgressDetail {
    pub bytes_done: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_total: Option<u64>,
    pub rate_bytes_per_second: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
}

/// What `POST /v1/vms` and VM actions answer.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Accepted {
    pub operation: Operation,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<Vm>,
}
