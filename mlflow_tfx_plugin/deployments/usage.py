"""The text of ``mlflow deployments help -t tfx``.

The config options are listed from :class:`~.config.DeploymentConfig`'s fields, so the help
never drifts from the code; the rest is the fixed text below.
"""

from __future__ import annotations

import textwrap
from typing import Any

from mlflow_tfx_plugin.deployments.config import API_KEY_ENV, DeploymentConfig
from mlflow_tfx_plugin.deployments.process import STARTUP_TIMEOUT_ENV
from mlflow_tfx_plugin.deployments.state import KEPT_LOGS, STATE_DIR_ENV


def target_help() -> str:
    """The text of ``mlflow deployments help -t tfx``; config docs come from the code."""
    fields = DeploymentConfig.model_fields
    width = max(len(key) for key in fields) + 4
    options = "\n".join(
        textwrap.fill(
            f"{key:<{width - 2}}{_field_text(info.description, info.default)}",
            width=92,
            initial_indent="  ",
            subsequent_indent=" " * width,
        )
        for key, info in fields.items()
    )
    return _HELP.format(
        options=options,
        api_key_env=API_KEY_ENV,
        state_env=STATE_DIR_ENV,
        startup_env=STARTUP_TIMEOUT_ENV,
        kept_logs=KEPT_LOGS,
    )


def _field_text(description: str | None, default: Any) -> str:
    text = (description or "").strip()
    if "default" in text.lower():
        return text
    return f"{text} (default: {'none' if default is None else default})"


_HELP = """\
The tfx target serves MLflow models of the tfx flavor (Hugging Face transformers) with an
OpenAI-compatible HTTP server, with the routes /v1/chat/completions, /v1/completions,
/v1/embeddings, /v1/models, /invocations and /health: one local process per deployment,
or with -C backend=ray a Ray Serve application of one or more replicas (see Ray backend).

Target URI
  tfx          records under ${state_env} (default ~/.mlflow-tfx/deployments)
  tfx:/PATH    records under PATH
  The state directory holds one JSON record per deployment, the server logs (logs/, the
  newest {kept_logs} of each deployment are kept) and the downloaded models (models/; a copy
  is removed when no deployment uses it any more). It never holds an API key. To purge
  everything, delete the deployments, then the directory.

Model URI (-m)
  runs:/RUN_ID/PATH, models:/NAME/VERSION, models:/NAME@ALIAS, models:/NAME/latest,
  models:/m-MODEL_ID, or a local model directory. Aliases, stages and 'latest' are resolved
  to a version once, at create/update time, and recorded (see `get`). A resolved model is
  downloaded once and reused.

Config options (-C key=value; create, update and run-local)
{options}

Environment
  {api_key_env}  the API key. Read by create/update/run-local when -C api_key is not
                      given (the key reaches the server only through its environment), and
                      by predict, which sends it as 'Authorization: Bearer KEY'.
  {state_env}  the state directory (see Target URI).
  {startup_env}  seconds to wait for a new server to load its model and answer
                      /health (default 600). 'timeout' above is the per-request limit.
  RAY_ADDRESS         the Ray cluster of backend=ray when -C ray_address is not given.

Ray backend (-C backend=ray; pip install "mlflow-tfx-plugin[ray]")
  mlflow deployments create -t tfx --name chat -m models:/chat/1 -C backend=ray \\
      -C num_replicas=2            (or -C min_replicas=1 -C max_replicas=4 to autoscale)
  The deployment is the Serve application 'chat' at http://HOST:PORT/chat, behind Serve's
  proxy (host/port: the proxy's; every deployment on a cluster shares one proxy). Each
  replica downloads the model itself: MLFLOW_TRACKING_URI, the registry URI and the
  storage/Hub credentials of this shell travel in the replicas' runtime environment, so
  on a multi-node cluster they must point at a tracking server and artifact store every
  node reaches, and every node needs the plugin installed. The API key travels only as
  its SHA-256. With no ray_address, $RAY_ADDRESS or running local cluster, create starts
  a local head with a token of its own (files under the state directory's ray/) and
  delete stops it with its last deployment; a cluster you started is never stopped.
  update is Serve's rolling update (it needs room for one more replica) and is rolled
  back if the new replicas fail; get shows serve_status, replicas and Serve's message.

Commands
  mlflow deployments create -t tfx --name chat -m models:/chat@prod -C max_batch_size=4
      Starts the server in the background and returns when /health answers. Fails if a
      running deployment 'chat' exists; a dead one is replaced.
  mlflow deployments list -t tfx
      name, status and url of each deployment.
  mlflow deployments get -t tfx --name chat
      The whole record. status is 'running' (it answers /health), 'loading', 'failed'
      (it cannot generate: see its log), 'unreachable', 'dead' (the process exited) or,
      in list, 'corrupt' (the record file is damaged: delete removes it and stops its
      server when its pid can still be read). For backend=ray it is Serve's application
      status: 'running', 'deploying', 'unhealthy', 'failed', 'deleting', 'dead' (no
      such application on the cluster) or 'unreachable' (the cluster cannot be reached).
  mlflow deployments predict -t tfx --name chat --input-path body.json
      body.json holds an OpenAI request: {{"messages": [...], "max_tokens": 16}} (chat),
      {{"prompt": ["..."]}} (completions), {{"input": ["..."]}} (embeddings); anything else
      goes to /invocations like `mlflow models serve` input. A JSON list of bodies sends one
      request each and prints {{"predictions": [...]}} (bodies that differ only in "prompt"
      or "input" are sent as one request with a list). Use a list also when a body has
      list-valued options such as "stop", which the CLI's pandas reader cannot take, and
      when every value is a scalar: the reader refuses {{"input": "hello"}} ("If using all
      scalar values, you must pass an index"), so write [{{"input": "hello"}}] or
      {{"input": ["hello"]}}.
      The CLI cannot stream; from Python, predict_stream() yields the chunks.
  mlflow deployments update -t tfx --name chat -m models:/chat/2 [-C key=value ...]
      Starts the new server on the same host and port (both listen at once), switches the
      record to it once its /health answers, then stops the old one gracefully (in-flight
      requests finish): the URL stays the same and no request fails. Config merges over
      the old one; with -C host=... or -C port=... the new server starts on that address
      instead. If the new server fails, it is stopped and the old one keeps serving.
  mlflow deployments delete -t tfx --name chat
      SIGTERM (in-flight requests finish), SIGKILL after 30 s; removes the record and the
      downloaded model copy (unless another deployment uses it); the logs stay.
  mlflow deployments run-local -t tfx --name chat -m models:/chat/1 -C port=8080
      Serves in the foreground until Ctrl-C; nothing is recorded.
  explain is not supported; use predict.

From Python
  from mlflow.deployments import get_deploy_client
  client = get_deploy_client("tfx")
  client.predict("chat", {{"messages": [{{"role": "user", "content": "Hi"}}]}})
  for chunk in client.predict_stream("chat", {{"messages": [...]}}):
      print(chunk["choices"][0]["delta"].get("content", ""), end="")
"""
