//! Deleting a database: the saga [`DB_DELETE`], forward-only. The record is marked
//! `deleting`, then the VM goes (its own delete saga: VMM, port, root disk, seed), then
//! the data volume unless it is kept (`?keep_volume=true`), then the record.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::create::{remove_vm, remove_volume};
use super::error::DatabaseError;
use super::record::{key, Database, DatabaseRecord, DbPhase};
use crate::model::Operation;
use crate::saga::{Saga, SagaDef, Step};
use crate::state::AppState;
use crate::store;

#[derive(Debug, Serialize, Deserialize)]
pub struct DbDelete {
    pub rec: DatabaseRecord,
    pub keep_volume: bool,
}

/// Marks the database `deleting` (compare-and-swap at `rev`) and deletes it in a task.
pub async fn begin(
    state: &Arc<AppState>,
    mut rec: DatabaseRecord,
    rev: u64,
    keep_volume: bool,
) -> Result<(Operation, Database), DatabaseError> {
    if rec.phase == DbPhase::Creating {
        return Err(DatabaseError::Busy {
            name: rec.name,
            phase: "being created".into(),
            action: "delete it (wait for its create operation)",
        });
    }
    rec.phase = DbPhase::Deleting;
    state
        .store
        .compare_and_swap(&key(&rec.project, &rec.name), Some(rev), store::encode(&rec))
        .await?;
    let db = Database::of(&rec, None);
    super::create::event(state, &rec, "deleting");
    let (project, name) = (rec.project.clone(), rec.name.clone());
    let mut saga = Saga::begin(
        state,
        &DB_DELETE,
        &uuid::Uuid::new_v4().to_string(),
        DbDelete { rec, keep_volume },
    )
    .await?;
    let op = saga.start_operation(state, &project, "database", &name).await?;
    let task_state = state.clone();
    tokio::spawn(async move {
        let _ = saga.finish(&task_state).await;
    });
    Ok((op, db))
}

fn nothing<'a>(_: &'a AppState, _: &'a DbDelete) -> futures_util::future::BoxFuture<'a, Result<(), DatabaseError>> {
    Box::pin(async { Ok(()) })
}

pub static DB_DELETE: SagaDef<DbDelete, DatabaseError> = SagaDef {
    kind: "database.delete",
    pivot: 0,
    steps: &[
        Step {
            name: "vm",
            doing: "deleting the VM",
            run: |state, c| Box::pin(remove_vm(state, &c.rec)),
            undo: nothing,
        },
        Step {
            name: "volume",
            doing: "removing the data volume",
            run: |state, c| {
                Box::pin(async move {
                    if c.keep_volume {
                        // The user's from now on: no later create of a database of
                        // this name may take it for its own (and undo it away).
                        let key = crate::volumes::records::record_key(&c.rec.project, &c.rec.volume);
                        store::update_json(
                            state.store.as_ref(),
                            &key,
                            |v: &mut crate::volumes::records::VolumeRecord| v.managed_by.take().is_some(),
                        )
                        .await?;
                        Ok(())
                    } else {
                        remove_volume(state, &c.rec).await
                    }
                })
            },
            undo: nothing,
        },
        Step {
            name: "record",
            doing: "removing the record",
            run: |state, c| {
                Box::pin(async move {
                    state.store.delete(&key(&c.rec.project, &c.rec.name)).await?;
                    super::create::event(state, &c.rec, "deleted");
                    Ok(())
                })
            },
            undo: nothing,
        },
    ],
};
