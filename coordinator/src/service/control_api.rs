//! The CLI-facing gRPC service.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use protocol::pb;
use protocol::pb::control_service_server::ControlService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::dataset_info::{dataset_info, quarantined_case, scan_summary};
use super::sweep_info::{manifest_info, sweep_action, sweep_detail, sweep_info};
use super::{checked_id, paging};
use crate::core::CoordError;
use crate::core::Coordinator;
use crate::records::{CheckpointRecord, MetricRecord, RunEvent, RunRecord, RunState, WorkerRecord};
use crate::scheduler::Waiting;

/// One value per metric name: rank 0's where it reports the metric, else the lowest rank's.
pub fn latest_by_name(latest: Vec<MetricRecord>) -> BTreeMap<String, MetricRecord> {
    let mut by_name: BTreeMap<String, MetricRecord> = BTreeMap::new();
    for m in latest {
        match by_name.get(&m.name) {
            Some(held) if held.rank <= m.rank => {}
            _ => {
                by_name.insert(m.name.clone(), m);
            }
        }
    }
    by_name
}

pub struct ControlApi(pub Arc<Coordinator>);

pub fn run_info(r: &RunRecord) -> pb::RunInfo {
    run_info_waiting(r, None)
}

/// A run as the CLI sees it; queued runs carry their queue position and why they wait.
pub fn run_info_waiting(r: &RunRecord, waiting: Option<&Waiting>) -> pb::RunInfo {
    pb::RunInfo {
        priority: r.priority,
        queue_position: waiting.map_or(0, |w| w.position),
        waiting_reason: waiting.map(|w| w.reason.clone()).unwrap_or_default(),
        sweep_id: r.sweep_id.clone().unwrap_or_default(),
        device: r.device.clone().unwrap_or_default(),
        run_id: r.id.clone(),
        name: r.name.clone(),
        state: r.state().to_string(),
        world_size: r.world_size,
        step: r.step,
        total_steps: r.total_steps,
        message: r.message.clone(),
        submitted_unix_ms: r.submitted_unix_ms,
        updated_unix_ms: r.updated_unix_ms,
        workers: r.workers.clone(),
        attempt: r.attempt,
        retries: r.retries_used(),
        max_retries: r.max_retries,
        retry_budget: r.retry_budget(),
        pause_requested: r.pause_requested,
    }
}

fn metric(m: &MetricRecord) -> pb::Metric {
    pb::Metric {
        rank: m.rank,
        step: m.step,
        name: m.name.clone(),
        value: m.value,
        unix_ms: m.unix_ms,
    }
}

fn checkpoint_info(c: &CheckpointRecord, resume_candidate: Option<u64>, best: Option<u64>) -> pb::CheckpointInfo {
    pb::CheckpointInfo {
        step: c.step,
        files: c
            .files
            .iter()
            .map(|f| pb::CheckpointFile {
                key: f.key.clone(),
                sha256: f.sha256.clone(),
                bytes: f.bytes,
            })
            .collect(),
        is_final: c.is_final,
        committed_unix_ms: c.committed_unix_ms,
        prefix: c.prefix.clone(),
        attempt: c.attempt,
        resume_candidate: resume_candidate == Some(c.step),
        unusable: c.unusable.clone().unwrap_or_default(),
        eval_dice: c.eval_dice.unwrap_or(0.0),
        has_eval_dice: c.eval_dice.is_some(),
        is_best: best == Some(c.step),
        weights_sha256: c.weights_sha256.clone().unwrap_or_default(),
    }
}

fn event_info(e: &RunEvent) -> pb::RunEvent {
    pb::RunEvent {
        unix_ms: e.unix_ms,
        kind: e.kind.clone(),
        message: e.message.clone(),
        step: e.step,
    }
}

fn worker_info(w: &WorkerRecord) -> pb::WorkerInfo {
    pb::WorkerInfo {
        worker_id: w.id.clone(),
        host: w.host.clone(),
        peer_address: w.peer_address.clone(),
        device_kind: w.device_kind.clone(),
        state: w.state.to_string(),
        run_id: w.run_id.clone().unwrap_or_default(),
        last_heartbeat_unix_ms: w.last_heartbeat_unix_ms,
        numeric_fingerprint: w.numeric_fingerprint.clone(),
    }
}

type MetricStream = Pin<Box<dyn Stream<Item = Result<pb::MetricRecord, Status>> + Send>>;
type ScanStream = Pin<Box<dyn Stream<Item = Result<pb::ScanDatasetEvent, Status>> + Send>>;

/// A dataset named by name or URL: a name must be an id; a URL is only ever compared.
fn checked_dataset(dataset: &str) -> Result<&str, Status> {
    if dataset.is_empty() {
        return Err(Status::invalid_argument("name a dataset (its name or URL)"));
    }
    Ok(dataset)
}

#[tonic::async_trait]
impl ControlService for ControlApi {
    async fn submit_run(&self, req: Request<pb::SubmitRunRequest>) -> Result<Response<pb::RunInfo>, Status> {
        let req = req.into_inner();
        let source = if req.source_name.is_empty() {
            "submitted spec"
        } else {
            req.source_name.as_str()
        };
        let run = self.0.submit(&req.spec_toml, source).await?;
        tracing::info!(run = %run.id, name = %run.name, world_size = run.world_size, "run submitted");
        Ok(Response::new(run_info(&run)))
    }

    /// Newest first, a page at a time: the page token is the submission counter of the last
    /// run given, so runs submitted meanwhile never shift a later page.
    async fn list_runs(&self, req: Request<pb::ListRunsRequest>) -> Result<Response<pb::ListRunsResponse>, Status> {
        let req = req.into_inner();
        let sweep = match req.sweep_id.as_str() {
            "" => None,
            id => Some(checked_id(id, "sweep id")?),
        };
        let state = match req.state.as_str() {
            "" => None,
            name => Some(RunState::from_name(name).ok_or_else(|| {
                let names: Vec<String> = RunState::ALL.iter().map(|s| s.to_string()).collect();
                Status::invalid_argument(format!("state `{name}`: not a run state; one of {}", names.join(", ")))
            })?),
        };
        let before = paging::cursor(&req.page_token)?;
        let listing = self.0.list_runs(sweep, state)?;
        let page = listing
            .runs
            .iter()
            .filter(|r| before.is_none_or(|b| r.seq < b))
            .map(|r| (r.seq, run_info_waiting(r, listing.waiting.get(&r.id))));
        let (runs, next) = paging::page(page, req.limit);
        Ok(Response::new(pb::ListRunsResponse {
            runs,
            next_page_token: next.map(|seq| seq.to_string()).unwrap_or_default(),
            total: listing.runs.len() as u32,
        }))
    }

    async fn get_run(&self, req: Request<pb::GetRunRequest>) -> Result<Response<pb::RunDetail>, Status> {
        let run_id = req.into_inner().run_id;
        checked_id(&run_id, "run id")?;
        let run = self.0.get_run(&run_id)?;
        let store = self.0.store();
        let candidate = self.0.resume_candidate(&run_id).await?;
        let checkpoints = store.checkpoints(&run_id).map_err(CoordError::from)?;
        let events = store.events(&run_id).map_err(CoordError::from)?;
        let by_name = latest_by_name(store.latest_metrics(&run_id).map_err(CoordError::from)?);
        let waiting = self.0.why_waiting(&run);
        Ok(Response::new(pb::RunDetail {
            manifest_id: run.manifest_id.clone(),
            run: Some(run_info_waiting(&run, waiting.as_ref())),
            spec_toml: run.spec_toml.clone(),
            checkpoints: {
                let best = crate::core::best_checkpoint(&checkpoints);
                checkpoints
                    .iter()
                    .map(|c| checkpoint_info(c, candidate, best))
                    .collect()
            },
            latest_metrics: by_name.values().map(metric).collect(),
            train_cases: run.train_count,
            eval_cases: run.eval_count,
            events: events.iter().map(event_info).collect(),
        }))
    }

    type StreamMetricsStream = MetricStream;

    async fn stream_metrics(&self, req: Request<pb::StreamMetricsRequest>) -> Result<Response<MetricStream>, Status> {
        let req = req.into_inner();
        checked_id(&req.run_id, "run id")?;
        self.0.get_run(&req.run_id)?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(follow_metrics(self.0.clone(), req, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_run(&self, req: Request<pb::CancelRunRequest>) -> Result<Response<pb::RunInfo>, Status> {
        let run_id = req.into_inner().run_id;
        checked_id(&run_id, "run id")?;
        Ok(Response::new(run_info(&self.0.cancel(&run_id).await?)))
    }

    async fn pause_run(&self, req: Request<pb::PauseRunRequest>) -> Result<Response<pb::RunInfo>, Status> {
        let run_id = req.into_inner().run_id;
        checked_id(&run_id, "run id")?;
        Ok(Response::new(run_info(&self.0.pause(&run_id).await?)))
    }

    async fn resume_run(&self, req: Request<pb::ResumeRunRequest>) -> Result<Response<pb::RunInfo>, Status> {
        let req = req.into_inner();
        checked_id(&req.run_id, "run id")?;
        let resumed = self.0.resume(&req.run_id, req.world_size, req.from_scratch).await?;
        Ok(Response::new(run_info(&resumed)))
    }

    async fn submit_sweep(&self, req: Request<pb::SubmitSweepRequest>) -> Result<Response<pb::SweepInfo>, Status> {
        let req = req.into_inner();
        let source = if req.source_name.is_empty() {
            "submitted sweep"
        } else {
            req.source_name.as_str()
        };
        let view = self.0.submit_sweep(&req.sweep_toml, source).await?;
        tracing::info!(sweep = %view.sweep.id, runs = view.children.len(), "sweep submitted");
        Ok(Response::new(sweep_info(&view)))
    }

    async fn list_sweeps(&self, _: Request<pb::ListSweepsRequest>) -> Result<Response<pb::ListSweepsResponse>, Status> {
        Ok(Response::new(pb::ListSweepsResponse {
            sweeps: self.0.sweeps().iter().map(sweep_info).collect(),
        }))
    }

    async fn get_sweep(&self, req: Request<pb::GetSweepRequest>) -> Result<Response<pb::SweepDetail>, Status> {
        let req = req.into_inner();
        checked_id(&req.sweep_id, "sweep id")?;
        let view = self.0.sweep(&req.sweep_id)?;
        let from = paging::cursor(&req.page_token)?;
        Ok(Response::new(sweep_detail(&self.0, &view, from, req.limit)?))
    }

    async fn cancel_sweep(
        &self,
        req: Request<pb::GetSweepRequest>,
    ) -> Result<Response<pb::SweepActionResponse>, Status> {
        let sweep_id = req.into_inner().sweep_id;
        checked_id(&sweep_id, "sweep id")?;
        let (view, results) = self.0.cancel_sweep(&sweep_id).await?;
        Ok(Response::new(sweep_action(&view, results)))
    }

    async fn resume_sweep(
        &self,
        req: Request<pb::GetSweepRequest>,
    ) -> Result<Response<pb::SweepActionResponse>, Status> {
        let sweep_id = req.into_inner().sweep_id;
        checked_id(&sweep_id, "sweep id")?;
        let (view, results) = self.0.resume_sweep(&sweep_id).await?;
        Ok(Response::new(sweep_action(&view, results)))
    }

    async fn list_manifests(
        &self,
        _: Request<pb::ListManifestsRequest>,
    ) -> Result<Response<pb::ListManifestsResponse>, Status> {
        let manifests = self.0.store().manifests().map_err(CoordError::from)?;
        Ok(Response::new(pb::ListManifestsResponse {
            manifests: manifests.iter().map(manifest_info).collect(),
        }))
    }

    type ScanDatasetStream = ScanStream;

    async fn scan_dataset(&self, req: Request<pb::ScanDatasetRequest>) -> Result<Response<ScanStream>, Status> {
        let req = req.into_inner();
        if req.url.trim().is_empty() {
            return Err(Status::invalid_argument("url: give the dataset URL to scan"));
        }
        if !req.name.is_empty() {
            checked_id(&req.name, "dataset name")?;
        }
        let (tx, rx) = mpsc::channel(64);
        let coord = self.0.clone();
        tokio::spawn(async move {
            let progress_tx = tx.clone();
            // Progress is best effort: a slow client misses some reports, never the summary.
            let mut progress = move |p: data::ScanProgress| {
                let event = pb::scan_dataset_event::Event::Progress(pb::ScanProgress {
                    objects: p.objects,
                    folders: p.cases,
                });
                let _ = progress_tx.try_send(Ok(pb::ScanDatasetEvent { event: Some(event) }));
            };
            let name = (!req.name.is_empty()).then_some(req.name.as_str());
            let result = coord.scan_dataset(&req.url, name, &mut progress).await;
            let message = match result {
                Ok(outcome) => Ok(pb::ScanDatasetEvent {
                    event: Some(pb::scan_dataset_event::Event::Summary(scan_summary(&outcome))),
                }),
                Err(e) => Err(Status::from(e)),
            };
            let _ = tx.send(message).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_datasets(
        &self,
        _: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        let datasets = self.0.datasets()?;
        Ok(Response::new(pb::ListDatasetsResponse {
            datasets: datasets.iter().map(|(d, q)| dataset_info(d, *q)).collect(),
        }))
    }

    async fn list_quarantine(
        &self,
        req: Request<pb::ListQuarantineRequest>,
    ) -> Result<Response<pb::ListQuarantineResponse>, Status> {
        let dataset = req.into_inner().dataset;
        let filter = match dataset.as_str() {
            "" => None,
            d => Some(checked_dataset(d)?),
        };
        let cases = self.0.quarantine(filter)?;
        Ok(Response::new(pb::ListQuarantineResponse {
            cases: cases.into_iter().map(|(name, q)| quarantined_case(name, q)).collect(),
        }))
    }

    async fn clear_quarantine(
        &self,
        req: Request<pb::ClearQuarantineRequest>,
    ) -> Result<Response<pb::ClearQuarantineResponse>, Status> {
        let req = req.into_inner();
        let dataset = checked_dataset(&req.dataset)?;
        let case = match req.case_id.as_str() {
            "" => None,
            id => Some(checked_id(id, "case id")?),
        };
        let cleared = self.0.clear_quarantine(dataset, case).await?;
        Ok(Response::new(pb::ClearQuarantineResponse { cleared }))
    }

    async fn list_workers(
        &self,
        _: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let workers = self.0.workers();
        Ok(Response::new(pb::ListWorkersResponse {
            workers: workers.iter().map(worker_info).collect(),
        }))
    }
}

/// Sends stored points from `from_seq` on; with `follow`, keeps sending until the run ends and
/// then closes with a record that carries the final state.
async fn follow_metrics(
    coord: Arc<Coordinator>,
    req: pb::StreamMetricsRequest,
    tx: mpsc::Sender<Result<pb::MetricRecord, Status>>,
) {
    let mut progress = coord.follow(&req.run_id);
    let mut next = req.from_seq;
    loop {
        progress.borrow_and_update();
        // Read the state before the points: a run that ends after this read still gets its last
        // points sent on the next pass.
        let state = coord.get_run(&req.run_id).map(|r| r.state());
        let points = coord.store().metrics_from(&req.run_id, next);
        let (state, points) = match (state, points) {
            (Ok(s), Ok(p)) => (s, p),
            (Err(e), _) => return drop(tx.send(Err(e.into())).await),
            (_, Err(e)) => return drop(tx.send(Err(CoordError::from(e).into())).await),
        };
        for (seq, m) in points {
            next = seq + 1;
            let record = pb::MetricRecord {
                seq,
                metric: Some(metric(&m)),
                run_state: String::new(),
            };
            if tx.send(Ok(record)).await.is_err() {
                return; // the client went away
            }
        }
        // A followed stream ends when the run stops moving: it ended, paused, or was interrupted
        // (an automatic resume continues under the same id; follow it again).
        use crate::records::RunState;
        let stopped = state.is_terminal() || matches!(state, RunState::Interrupted | RunState::Paused);
        if !req.follow || stopped {
            if req.follow {
                let _ = tx
                    .send(Ok(pb::MetricRecord {
                        seq: next,
                        metric: None,
                        run_state: state.to_string(),
                    }))
                    .await;
            }
            return;
        }
        // Wake on progress, and at least once a second so a dropped client is noticed.
        let _ = tokio::time::timeout(Duration::from_secs(1), progress.changed()).await;
        if tx.is_closed() {
            return;
        }
    }
}
