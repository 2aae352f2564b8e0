""".github/workflows: actionlint, the GitHub workflow schema and shellcheck find nothing, and the
release workflow keeps its promises (pull requests build without secrets and push nothing; both
platforms; latest/sha/semver tags)."""

from __future__ import annotations

import json
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


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_actions_are_pinned_to_major_versions_and_permissions_are_read_only(path):
    workflow = load(path)
    for step in steps(workflow):
        if "uses" in step:
            assert re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+", step["uses"]), f"pin {step['uses']} to a major version"
    assert workflow["permissions"] == {"contents": "read"}
    for job in workflow["jobs"].values():
        assert "permissions" not in job or set(job["permissions"].values()) <= {"read", "none"}
        assert 0 < job["timeout-minutes"] <= 360


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
    not_pr = "github.event_name != 'pull_request'"
    login = step_using(workflow, "docker/login-action")
    assert login["if"].strip() == not_pr
    assert login["with"] == {"username": "${{ vars.DOCKERHUB_USERNAME }}", "password": "${{ secrets.DOCKERHUB_TOKEN }}"}
    build = step_with_id(workflow, "build")["with"]
    assert build["push"] == "${{ " + not_pr + " }}"
    assert "${{ vars.DOCKERHUB_USERNAME" in workflow["env"]["IMAGE"]
    assert workflow["env"]["IMAGE"].endswith("/paligemma-segmentation")


def test_release_builds_both_platforms_with_a_layer_cache():
    workflow = load(RELEASE)
    build = step_with_id(workflow, "build")["with"]
    assert set(build["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}
    assert build["cache-from"].startswith("type=gha")
    assert build["cache-to"].startswith("type=gha")
    assert build["tags"] == "${{ steps.meta.outputs.tags }}"
    assert build["file"] == build["context"] + "/env/docker/Dockerfile"
    assert build["build-args"].splitlines() == ["SEG_MODEL_SOURCE=${{ env.SEG_MODEL_SOURCE }}"]
    position = step_index(workflow, lambda s: s.get("id") == "build")
    for action in ("docker/setup-qemu-action", "docker/setup-buildx-action", "docker/metadata-action"):
        assert step_index(workflow, lambda s, a=action: s.get("uses", "").startswith(a)) < position
    context = step_index(workflow, lambda s: "scripts/bento_context.py" in s.get("run", ""))
    bento = step_index(workflow, lambda s: "make --no-print-directory build" in s.get("run", ""))
    assert bento < context < position


def test_release_starts_the_amd64_image_and_segments_once_before_pushing():
    workflow = load(RELEASE)
    builds = [s for s in steps(workflow) if s.get("uses", "").startswith("docker/build-push-action")]
    [check_build] = [s for s in builds if s.get("id") != "build"]
    release = step_with_id(workflow, "build")["with"]
    assert check_build["with"]["platforms"] == "linux/amd64"
    assert check_build["with"]["load"] is True and check_build["with"]["push"] is False
    for same in ("context", "file", "build-args", "cache-from"):
        assert check_build["with"][same] == release[same], f"the start check builds another {same}"
    tag = check_build["with"]["tags"]
    run = "docker run -d --name start-check -p 127.0.0.1:3000:3000"
    [start] = [s for s in steps(workflow) if run in s.get("run", "")]
    assert tag in start["run"] and "scripts/image/smoke.py http://127.0.0.1:3000" in start["run"]
    assert start["run"].rstrip().endswith('exit "$status"'), "a failed check fails the job"
    order = [step_index(workflow, lambda s, x=x: s is x) for x in (check_build, start)]
    assert order == sorted(order) and order[-1] < step_index(workflow, lambda s: s.get("id") == "build")
    assert order[-1] < step_index(workflow, lambda s: s.get("uses", "").startswith("docker/login-action"))


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
    """Forks' pull requests get no secrets: their builds must not need HF_TOKEN."""
    from segmentation.serving.settings import DEFAULT_MODEL

    workflow = load(RELEASE)
    assert workflow["env"]["FIXTURE_MODEL"] == DEFAULT_MODEL
    assert workflow["env"]["SEG_MODELS"].startswith(
        "${{ github.event_name == 'pull_request' && '" + DEFAULT_MODEL + "' || inputs.models || vars.SEG_MODELS || '")
    assert workflow["env"]["SEG_MODELS"].endswith(f"'{DEFAULT_MODEL}' }}}}")
    [imports] = [s for s in steps(workflow) if "scripts/import_models.py" in s.get("run", "")]
    script = imports["run"]
    pr_branch = script[: script.index("exit 0")]
    assert '[ "$EVENT" = pull_request ]' in pr_branch
    assert "scripts/make_tiny_model.py --out .fixtures/tiny" in pr_branch
    assert '--local .fixtures/tiny/paligemma --as "$FIXTURE_MODEL"' in pr_branch
    assert "--vae-file .fixtures/tiny/vae-oid.npz" in pr_branch
    assert "--hub" not in pr_branch and "HF_TOKEN" not in pr_branch
    assert imports["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"


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
