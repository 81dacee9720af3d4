//! Importing an image: the saga [`IMAGE_IMPORT`]. imaged does the work in a job of its
//! own; the api starts the job (a bad name, URL or path is refused at once, before the
//! `202`) and mirrors it into the operation until it ends. Once the job is started the
//! import only goes forwards: an api that restarts meanwhile follows the same job again
//! (in the background, so the api serves while a long download finishes), or starts it
//! again when imaged lost it, instead of failing the operation.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use imaged::import::{ImportRequest, ImportState};
use serde::{Deserialize, Serialize};

use crate::daemons::upstream;
use crate::images::error::ImageError;
use crate::model::{Operation, ProgressDetail};
use crate::saga::{Saga, SagaDef, Step};
use crate::state::AppState;

/// What an import's saga carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageImport {
    /// The saga's (and its operation's) id.
    pub id: String,
    pub request: ImportRequest,
    /// imaged's job, once started.
    #[serde(default)]
    pub job: Option<String>,
}

/// Starts the import and answers with its operation and imaged's job id; the rest
/// runs in a task.
pub async fn begin(
    state: &Arc<AppState>,
    project: &str,
    request: ImportRequest,
) -> Result<(Operation, String), ImageError> {
    let id = uuid::Uuid::new_v4().to_string();
    let name = request.name.clone();
    let context = ImageImport {
        id: id.clone(),
        request,
        job: None,
    };
    let mut saga = Saga::begin(state, &IMAGE_IMPORT, &id, context).await?;
    saga.run_until(state, Some(FOLLOW)).await?;
    let op = match saga.start_operation(state, project, "image", &name).await {
        Ok(op) => op,
        Err(e) => {
            saga.abandon(state, &e).await;
            return Err(e.into());
        }
    };
    let job = saga.context.job.clone().unwrap_or_default();
    let task_state = state.clone();
    // The saga records its operation's end itself.
    tokio::spawn(async move {
        let _ = saga.finish(&task_state).await;
    });
    Ok((op, job))
}

const FOLLOW: &str = "follow";

/// Importing an image: started, then followed to its end. Past the start (`pivot` 1) a
/// crash resumes following; imaged removes what a failed import left itself.
pub static IMAGE_IMPORT: SagaDef<ImageImport, ImageError> = SagaDef {
    kind: "image.import",
    pivot: 1,
    steps: &[
        Step {
            name: "start",
            doing: "starting the import in imaged",
            run: |state, c| Box::pin(start(state, c)),
            // A job that started runs to its end in imaged (it cleans up after itself
            // if it fails); one that did not start made nothing.
            undo: |_, _| Box::pin(async { Ok(()) }),
        },
        Step {
            name: FOLLOW,
            doing: "importing",
            run: |state, c| Box::pin(follow(state, c)),
            undo: |_, _| Box::pin(async { Ok(()) }),
        },
    ],
};

async fn start(state: &AppState, c: &mut ImageImport) -> Result<(), ImageError> {
    // imaged checks the request at once: a bad name, URL or path is a 422 here.
    let job = state.images.import(&c.request).await.map_err(upstream)?;
    c.job = Some(job.id);
    Ok(())
}

/// Mirrors imaged's job into the operation until it ends: its phase and byte counts
/// while it runs, its error if it fails.
async fn follow(state: &AppState, c: &mut ImageImport) -> Result<(), ImageError> {
    let mut job = c.job.clone().ok_or(ImageError::NoJob)?;
    let (mut failures, mut restarts) = (0, 0);
    loop {
        match state.images.import_status(&job, 1.0).await {
            Ok(st) => {
                failures = 0;
                match st.state {
                    ImportState::Running => {
                        let detail = ProgressDetail {
                            bytes_done: st.bytes_done,
                            bytes_total: st.bytes_total,
                            rate_bytes_per_second: st.rate_bytes_per_second,
                            eta_seconds: st.eta_seconds,
                        };
                        state.ops.progress_detail(&c.id, &st.phase, detail).await;
                    }
                    ImportState::Succeeded => return Ok(()),
                    ImportState::Failed => {
                        let Some(body) = st.error else {
                            return Err(ImageError::ImportFailedUnsaid);
                        };
                        let status = st
                            .error_status
                            .and_then(|s| StatusCode::from_u16(s).ok())
                            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                        return Err(ImageError::ImportFailed { status, body });
                    }
                }
            }
            // imaged restarted and lost its job (with --all-in-one it goes with the api):
            // the import starts again (an HTTP download resumes where its part file
            // ends).
            Err(e) if e.is_not_found() && restarts < 3 => {
                restarts += 1;
                tracing::info!(import = %job, image = %c.request.name, "imaged lost the import job; starting it again");
                job = state.images.import(&c.request).await.map_err(upstream)?.id;
                c.job = Some(job.clone());
            }
            Err(e) => {
                failures += 1;
                if failures >= 5 {
                    return Err(ImageError::LostTrack(e.to_string()));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
