import mlflow

from apollo_ray.tracking import Tracker


def test_stage_runs_nest_under_pipeline_with_lineage_tags(make_cfg, tmp_path):
    cfg = make_cfg()
    assert cfg.tracking_uri() == f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    tracker = Tracker(cfg)
    with tracker.pipeline() as parent:
        with tracker.stage("collect", inputs={"sources": "abc123"}, output="/x/corpus/fp",
                           section=cfg.data.model_dump(mode="json")) as run:
            run.log_metrics({"paragraphs": 42.0}, step=0)
        with tracker.stage("rewrite", inputs={"corpus": "def456"}, output="/x/qa/fp") as run2:
            pass
    client = mlflow.MlflowClient(cfg.tracking_uri())
    child = client.get_run(run.run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent.run_id
    assert child.data.tags["apollo.input.sources"] == "abc123"
    assert child.data.tags["apollo.output_uri"] == "/x/corpus/fp"
    assert child.data.tags["apollo.git_sha"]
    assert child.data.metrics["paragraphs"] == 42.0
    assert child.data.params["cfg.train.lr"] == str(cfg.train.lr)
    assert child.data.params["collect.min_chars"] == str(cfg.data.min_chars)
    assert child.info.status == "FINISHED"
    assert client.get_run(run2.run_id).data.tags["mlflow.parentRunId"] == parent.run_id


def test_failed_stage_is_marked_failed(make_cfg):
    cfg = make_cfg()
    tracker = Tracker(cfg)
    rid = None
    try:
        with tracker.stage("train") as run:
            rid = run.run_id
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert mlflow.MlflowClient(cfg.tracking_uri()).get_run(rid).info.status == "FAILED"


def test_tracking_off_is_a_noop(make_cfg):
    cfg = make_cfg("tracking.enabled=false")
    with Tracker(cfg).stage("collect") as run:
        run.log_metrics({"x": 1.0})
        assert run.run_id is None
