"""cluster/aws.yaml, checked offline: Ray's own config schema, Ray's AWS bootstrap against
moto's mocked AWS (no network), the security of what it resolves, and the README's commands.
"""
import contextlib
import copy
import importlib.util
import ipaddress
import re
import shlex
import stat
import tomllib
import types
from importlib import metadata
from pathlib import Path

import boto3
import jsonschema
import pytest
import yaml
from moto import mock_aws
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from ray.autoscaler._private.aws import config as ray_aws_config
from ray.autoscaler._private.aws import utils as ray_aws_utils
from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
from ray.autoscaler._private.commands import _bootstrap_config
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster" / "aws.yaml"
SETUP_SCRIPT = REPO / "cluster" / "aws_setup.py"
SECURITY_GROUP_PLACEHOLDER = "sg-EDIT-ME"
RAY_PORTS = (6379, 8265, 10001)  # GCS, dashboard and job API, Ray client
SSH_CIDR = "203.0.113.7/32"  # documentation addresses standing in for the user's IP
OLD_SSH_CIDR = "198.51.100.23/32"
BUCKET = "my-raykd-results"


def _load_setup_script():
    spec = importlib.util.spec_from_file_location("aws_setup", SETUP_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


aws_setup = _load_setup_script()


def cluster_config(path=CLUSTER_YAML, security_group=None):
    """The cluster config as `ray up` reads it; with ``security_group``, after the user pasted
    that id over the placeholder as the README says."""
    text = path.read_text()
    if security_group is not None:
        text = text.replace(SECURITY_GROUP_PLACEHOLDER, security_group)
    return yaml.safe_load(text)


def node_configs(config):
    """Each node type's EC2 launch parameters, by node type name."""
    return {name: node["node_config"] for name, node in config["available_node_types"].items()}


def cidr_ingress(ip_permissions):
    """(protocol, first port, last port, CIDR) for every CIDR-sourced ingress rule."""
    rules = []
    for permission in ip_permissions:
        protocol = permission["IpProtocol"]
        if protocol == "-1":
            first, last = 0, 65535
        else:
            first, last = permission.get("FromPort"), permission.get("ToPort")
        cidrs = [r["CidrIp"] for r in permission.get("IpRanges", [])]
        cidrs += [r["CidrIpv6"] for r in permission.get("Ipv6Ranges", [])]
        rules += [(protocol, first, last, cidr) for cidr in cidrs]
    return rules


def covers(rule, port):
    protocol, first, last, _ = rule
    return protocol in ("-1", "tcp", "6") and first <= port <= last


def open_to_world(rules):
    """The rules that let anyone on the internet reach SSH or a Ray port."""
    return [
        rule
        for rule in rules
        if ipaddress.ip_network(rule[3]).prefixlen == 0
        and any(covers(rule, port) for port in (22, *RAY_PORTS))
    ]


def assert_only_ssh_from(groups, ssh_cidr):
    """Each group (as EC2 describes it) admits the internet only on tcp/22 from ``ssh_cidr``;
    anything else comes from cluster members (references to these groups)."""
    group_ids = {group["GroupId"] for group in groups}
    for group in groups:
        rules = cidr_ingress(group["IpPermissions"])
        assert open_to_world(rules) == []
        assert not [rule for rule in rules if any(covers(rule, port) for port in RAY_PORTS)]
        assert rules == [("tcp", 22, 22, ssh_cidr)]
        for permission in group["IpPermissions"]:
            assert permission.get("PrefixListIds", []) == []
            for pair in permission.get("UserIdGroupPairs", []):
                assert pair["GroupId"] in group_ids


REGION = cluster_config()["provider"]["region"]


@contextlib.contextmanager
def offline_account(monkeypatch, home, managed_policies=False):
    """A fresh mocked AWS account in the cluster's region, with EC2 and IAM clients: fake
    credentials, ``home`` as HOME (Ray writes the SSH key under ~/.ssh) and no waits.

    ``managed_policies`` loads AWS's managed IAM policies into moto, which attaching one
    needs; that costs seconds per account, so only the tests that attach one ask for it."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("AWS_SHARED_CREDENTIALS_FILE", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MOTO_IAM_LOAD_MANAGED_POLICIES", "true" if managed_policies else "false")
    # Ray waits twice for 15 s for IAM to propagate; only its own module sees this stand-in.
    monkeypatch.setattr(ray_aws_config, "time", types.SimpleNamespace(sleep=lambda seconds: None))
    # Ray caches boto clients and subnet lookups per process; each account starts clean.
    ray_aws_utils.resource_cache.cache_clear()
    ray_aws_utils.client_cache.cache_clear()
    ray_aws_config._get_subnets_or_die.cache_clear()
    with mock_aws():
        yield types.SimpleNamespace(
            ec2=boto3.client("ec2", region_name=REGION),
            iam=boto3.client("iam", region_name=REGION),
        )


@pytest.fixture
def offline_aws(monkeypatch, tmp_path):
    with offline_account(monkeypatch, tmp_path) as account:
        yield account


def _account_snapshot(ec2, iam, resolved):
    """What the mocked account holds after bootstrap, as plain data."""
    roles = {}
    for profile_name in (aws_setup.HEAD_PROFILE, aws_setup.WORKER_PROFILE):
        profile = iam.get_instance_profile(InstanceProfileName=profile_name)["InstanceProfile"]
        (role,) = profile["Roles"]
        name = role["RoleName"]
        attached = iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"]
        roles[profile_name] = types.SimpleNamespace(
            arn=role["Arn"],
            attached=[policy["PolicyName"] for policy in attached],
            inline={
                policy: iam.get_role_policy(RoleName=name, PolicyName=policy)["PolicyDocument"]
                for policy in iam.list_role_policies(RoleName=name)["PolicyNames"]
            },
        )
    subnet_ids = sorted({s for node in node_configs(resolved).values() for s in node["SubnetIds"]})
    return types.SimpleNamespace(
        roles=roles,
        key_pairs=[k["KeyName"] for k in ec2.describe_key_pairs()["KeyPairs"]],
        security_groups={g["GroupId"]: g for g in ec2.describe_security_groups()["SecurityGroups"]},
        subnets=ec2.describe_subnets(SubnetIds=subnet_ids)["Subnets"],
    )


def _launch_one_of_each(ec2, resolved):
    """Ray's node provider starts one instance per node type; moto checks each request
    against EC2's RunInstances API model. Returns the instances as EC2 describes them."""
    provider = AWSNodeProvider(resolved["provider"], resolved["cluster_name"])
    instances = {}
    for name, node in node_configs(resolved).items():
        provider.create_node(node, {"ray-user-node-type": name}, 1)
        reservations = ec2.describe_instances(
            Filters=[{"Name": "tag:ray-user-node-type", "Values": [name]}]
        )["Reservations"]
        (instances[name],) = [i for r in reservations for i in r["Instances"]]
    return instances


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The README's path in one mocked account: cluster/aws_setup.py, the id pasted into
    cluster/aws.yaml, then what `ray up` does before it starts instances
    (``_bootstrap_config``: prepare, detect node resources, validate, ``bootstrap_aws``),
    then one instance of each node type. The setup runs twice, the first time from an
    old IP, as when a user reruns it after their IP changed. Detecting resources pages
    through every EC2 instance type, which is slow under moto, so this runs once per module
    and hands the tests a snapshot."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as monkeypatch:
        with offline_account(monkeypatch, home, managed_policies=True) as account:
            ec2, iam = account.ec2, account.iam
            first_group_id = aws_setup.ensure_security_group(ec2, OLD_SSH_CIDR)
            aws_setup.ensure_instance_profiles(iam, BUCKET)
            group_id = aws_setup.ensure_security_group(ec2, SSH_CIDR)
            aws_setup.ensure_instance_profiles(iam, BUCKET)
            config = cluster_config(security_group=group_id)
            resolved = _bootstrap_config(copy.deepcopy(config), no_config_cache=True)
            snapshot = _account_snapshot(ec2, iam, resolved)
            calls = []  # the EC2 operations the head's autoscaler makes from here on
            ray_aws_utils.resource_cache.cache_clear()  # Ray's boto objects, made anew with the hook
            ray_aws_utils.client_cache.cache_clear()
            events = boto3._get_default_session().events
            events.register("before-call.ec2", lambda model, **kwargs: calls.append(model.name))
            snapshot.instances = _launch_one_of_each(ec2, resolved)
            provider = AWSNodeProvider(resolved["provider"], resolved["cluster_name"])
            provider.terminate_nodes(provider.non_terminated_nodes({}))
            snapshot.autoscaler_calls = sorted(set(calls))
    snapshot.home, snapshot.resolved = home, resolved
    snapshot.group_id, snapshot.first_group_id = group_id, first_group_id
    return snapshot


# --- Ray's schema -------------------------------------------------------------------------


def test_ray_schema_accepts_the_cluster_config():
    prepared = prepare_config(cluster_config())
    validate_config(prepared)

    node_types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    workers = {name: node for name, node in node_types.items() if name != head}
    # Nothing runs at rest: every worker type scales from zero.
    assert {node["min_workers"] for node in workers.values()} == {0}
    assert sum(node["max_workers"] for node in workers.values()) <= prepared["max_workers"]
    # One explicit image on every node type: Ray's fallback AMI is an Ubuntu 18.04 one.
    (image,) = {node["node_config"]["ImageId"] for node in node_types.values()}
    assert re.fullmatch(r"ami-[0-9a-f]{17}", image)
    # One line to edit for the security group: a YAML anchor shared by all node types.
    assert CLUSTER_YAML.read_text().count(SECURITY_GROUP_PLACEHOLDER) == 1
    # `ray up cluster/aws.yaml` runs from the repository root, so "." is the repository.
    assert (REPO / prepared["file_mounts"]["~/raykd"]).resolve() == REPO


def _unknown_top_level_key(config):
    config["max_worker"] = 6


def _wrong_type(config):
    config["max_workers"] = "six"


def _node_type_without_node_config(config):
    del config["available_node_types"]["gpu_8x"]["node_config"]


def _negative_gpu_count(config):
    config["available_node_types"]["gpu_1x"]["resources"] = {"GPU": -1}


def _unknown_head_node_type(config):
    config["head_node_type"] = "gpu_head"


@pytest.mark.parametrize(
    "breakage, complaint",
    [
        (_unknown_top_level_key, "'max_worker' was unexpected"),
        (_wrong_type, "'six' is not of type 'integer'"),
        (_node_type_without_node_config, "'node_config' is a required property"),
        (_negative_gpu_count, "-1 is less than the minimum of 0"),
        (_unknown_head_node_type, "must be one of `available_node_types`"),
    ],
)
def test_ray_schema_rejects_a_broken_copy(breakage, complaint):
    config = cluster_config()
    breakage(config)
    prepared = prepare_config(config)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(complaint)):
        validate_config(prepared)


def test_no_credentials_in_the_cluster_files():
    config = cluster_config()
    # Ray generates the key pair; a private key path here would point into someone's ~/.ssh.
    assert "ssh_private_key" not in config["auth"]
    assert all("KeyName" not in node for node in node_configs(config).values())
    for path in (CLUSTER_YAML, SETUP_SCRIPT):
        text = path.read_text()
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), path
        assert not re.search(r"aws_secret_access_key|SecretAccessKey", text, re.I), path


# --- Ray's AWS bootstrap against moto ----------------------------------------------------


def test_bootstrap_resolves_iam_key_pair_and_security_group(launched):
    nodes = node_configs(launched.resolved)

    # IAM: the head's profile can launch workers and write the bucket; the workers' can
    # write the bucket (Tune's --storage s3://...). Both exist in the account.
    assert nodes["head"]["IamInstanceProfile"] == {"Name": aws_setup.HEAD_PROFILE}
    for worker in ("gpu_1x", "gpu_8x"):
        assert nodes[worker]["IamInstanceProfile"] == {"Name": aws_setup.WORKER_PROFILE}
    head, worker = launched.roles[aws_setup.HEAD_PROFILE], launched.roles[aws_setup.WORKER_PROFILE]
    for role in (head, worker):
        statements = role.inline["raykd-results"]["Statement"]
        granted = {(action, s["Resource"]) for s in statements for action in s["Action"]}
        assert ("s3:PutObject", f"arn:aws:s3:::{BUCKET}/*") in granted
        assert ("s3:ListBucket", f"arn:aws:s3:::{BUCKET}") in granted
    assert sorted(worker.inline) == ["raykd-results"] and worker.attached == []
    assert head.attached == []  # no AmazonEC2FullAccess
    assert head.inline["raykd-launch-workers"] == aws_setup.head_launch_policy(worker.arn)

    # Key pair: created in the account, private key in ~/.ssh of the (temporary) HOME only.
    key_names = {node["KeyName"] for node in nodes.values()}
    assert len(key_names) == 1 and key_names <= set(launched.key_pairs)
    key_path = Path(launched.resolved["auth"]["ssh_private_key"])
    assert key_path.parent == launched.home / ".ssh"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600

    # Security group: the pre-made one on every node (rerunning the setup kept it);
    # subnets chosen inside its VPC.
    assert launched.group_id == launched.first_group_id
    assert {tuple(node["SecurityGroupIds"]) for node in nodes.values()} == {(launched.group_id,)}
    vpc_id = launched.security_groups[launched.group_id]["VpcId"]
    assert {subnet["VpcId"] for subnet in launched.subnets} == {vpc_id}


def test_node_types_get_the_gpus_the_study_needs(launched):
    node_types = launched.resolved["available_node_types"]
    resources = {name: node["resources"] for name, node in node_types.items()}
    assert "GPU" not in resources["head"]
    # No trial lands on the head: it offers no CPU to Ray's scheduler; the workers offer theirs.
    assert resources["head"]["CPU"] == 0
    assert resources["gpu_1x"]["CPU"] > 0 and resources["gpu_8x"]["CPU"] > 0
    assert resources["gpu_1x"]["GPU"] == 1
    assert resources["gpu_8x"]["GPU"] == 8


def test_no_rule_opens_ray_ports_or_ssh_to_the_world(launched):
    """Only SSH from the user's current IP reaches the nodes; the old IP's rule is gone."""
    nodes = node_configs(launched.resolved).values()
    used = {group for node in nodes for group in node["SecurityGroupIds"]}
    assert_only_ssh_from([launched.security_groups[group] for group in used], SSH_CIDR)
    # Nothing else in the account was opened on the way (only the VPC's default group).
    assert sorted(g["GroupName"] for g in launched.security_groups.values()) == [
        "default",
        aws_setup.SECURITY_GROUP_NAME,
    ]
    for group in launched.security_groups.values():
        assert open_to_world(cidr_ingress(group["IpPermissions"])) == []


def test_every_node_type_launches_as_configured(launched):
    for name, node in node_configs(launched.resolved).items():
        instance = launched.instances[name]
        assert instance["InstanceType"] == node["InstanceType"]
        assert instance["ImageId"] == node["ImageId"]
        assert instance["IamInstanceProfile"]["Arn"].endswith(
            "instance-profile/" + node["IamInstanceProfile"]["Name"]
        )
        assert [g["GroupId"] for g in instance["SecurityGroups"]] == [launched.group_id]


def test_ray_default_security_group_opens_ssh_to_the_world(offline_aws):
    """Why the config names a pre-made group: the one Ray creates always admits SSH from
    0.0.0.0/0, even when provider.security_group lists a narrower SSH rule."""
    config = cluster_config()
    for node in node_configs(config).values():
        del node["SecurityGroupIds"]
    config["provider"]["security_group"] = {
        "GroupName": "ray-default-test",
        "IpPermissions": [
            {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": SSH_CIDR}]}
        ],
    }
    resolved = ray_aws_config.bootstrap_aws(prepare_config(config))
    group_id = node_configs(resolved)["head"]["SecurityGroupIds"][0]
    group = offline_aws.ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
    assert ("tcp", 22, 22, "0.0.0.0/0") in open_to_world(cidr_ingress(group["IpPermissions"]))


def test_unedited_config_fails_before_opening_anything(offline_aws, capfd):
    """With the placeholder still in place, bootstrap stops at the security group check."""
    with pytest.raises(AssertionError):
        ray_aws_config.bootstrap_aws(prepare_config(cluster_config()))
    assert "Failed to detect a security group" in capfd.readouterr().err
    groups = offline_aws.ec2.describe_security_groups()["SecurityGroups"]
    assert [group["GroupName"] for group in groups] == ["default"]


# --- cluster/aws_setup.py ----------------------------------------------------------------


def test_the_head_policy_covers_every_call_the_autoscaler_made_and_no_more(launched):
    """Every EC2 operation Ray's node provider made (launch, list, terminate) is allowed,
    and the policy allows nothing the provider's code does not call."""
    assert {"RunInstances", "DescribeInstances", "TerminateInstances"} <= set(launched.autoscaler_calls)
    allowed = set(aws_setup.HEAD_AUTOSCALER_ACTIONS)
    assert {f"ec2:{call}" for call in launched.autoscaler_calls} <= allowed, launched.autoscaler_calls
    [autoscaler, pass_role] = aws_setup.head_launch_policy("arn:aws:iam::123456789012:role/raykd-worker")["Statement"]
    assert autoscaler["Action"] == sorted(allowed) and all(a.startswith("ec2:") for a in allowed)
    assert pass_role == {
        "Sid": "PassWorkerRoleToEC2", "Effect": "Allow", "Action": "iam:PassRole",
        "Resource": "arn:aws:iam::123456789012:role/raykd-worker",
        "Condition": {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}},
    }


def test_rerunning_the_setup_detaches_the_old_full_ec2_access(monkeypatch, tmp_path):
    with offline_account(monkeypatch, tmp_path, managed_policies=True) as account:
        aws_setup.ensure_instance_profiles(account.iam, BUCKET)
        account.iam.attach_role_policy(RoleName=aws_setup.HEAD_PROFILE, PolicyArn=aws_setup.EC2_FULL_ACCESS)
        aws_setup.ensure_instance_profiles(account.iam, BUCKET)
        attached = account.iam.list_attached_role_policies(RoleName=aws_setup.HEAD_PROFILE)["AttachedPolicies"]
    assert attached == []


@pytest.mark.parametrize("cidr,allowed", [
    ("203.0.113.7/32", True), ("10.20.0.0/16", True), ("2001:db8:1::/48", True), ("2001:db8::1/128", True),
    ("10.0.0.0/15", False), ("0.0.0.0/1", False), ("128.0.0.0/1", False), ("2001:db8::/32", False),
])
def test_ssh_must_come_from_a_host_or_a_narrow_network(cidr, allowed):
    if allowed:
        assert str(aws_setup.ssh_network(cidr)) == cidr
    else:
        with pytest.raises(ValueError, match="--allow-wide-ssh"):
            aws_setup.ssh_network(cidr)
        assert str(aws_setup.ssh_network(cidr, allow_wide=True)) == cidr


def test_setup_refuses_bad_input_before_touching_the_account(offline_aws):
    bad_inputs = [
        (["--ssh-cidr", "0.0.0.0/0", "--bucket", BUCKET], "--ssh-cidr"),
        (["--ssh-cidr", "0.0.0.0/1", "--bucket", BUCKET], "--ssh-cidr"),
        (["--ssh-cidr", "0.0.0.0/0", "--allow-wide-ssh", "--bucket", BUCKET], "--ssh-cidr"),
        (["--ssh-cidr", "::/0", "--bucket", BUCKET], "--ssh-cidr"),
        (["--ssh-cidr", "203.0.113.300/32", "--bucket", BUCKET], "--ssh-cidr"),
        (["--ssh-cidr", SSH_CIDR, "--bucket", "Not_A_Bucket"], "--bucket"),
        (["--ssh-cidr", SSH_CIDR, "--bucket", BUCKET, "--cluster-config", "/nowhere/aws.yaml"],
         "--cluster-config"),
    ]
    for argv, field in bad_inputs:
        with pytest.raises(ValueError, match=field):
            aws_setup.main(["--region", REGION, *argv])
    groups = offline_aws.ec2.describe_security_groups()["SecurityGroups"]
    assert [group["GroupName"] for group in groups] == ["default"]
    assert offline_aws.iam.list_roles()["Roles"] == []


def test_setup_rewrites_the_group_id_of_an_earlier_run(tmp_path):
    written = tmp_path / "aws.yaml"
    written.write_text(CLUSTER_YAML.read_text())
    aws_setup.write_security_group(written, "sg-0123456789abcdef0")
    aws_setup.write_security_group(written, "sg-0fedcba9876543210")
    config = cluster_config(path=written)
    assert {tuple(node["SecurityGroupIds"]) for node in node_configs(config).values()} == {("sg-0fedcba9876543210",)}
    broken = tmp_path / "broken.yaml"
    broken.write_text(CLUSTER_YAML.read_text().replace("&cluster_security_group", "&groups"))
    with pytest.raises(ValueError, match="--cluster-config"):
        aws_setup.write_security_group(broken, "sg-0123456789abcdef0")


# --- what the nodes install ----------------------------------------------------------------


def test_nodes_install_the_versions_the_tests_run_on():
    commands = " ".join(cluster_config()["setup_commands"])
    pinned = re.findall(r'"?([A-Za-z0-9_.\-\[\],]+==[^\s"]+)"?', commands)
    pins = {canonicalize_name(r.name): r for r in map(Requirement, pinned)}
    for name, requirement in pins.items():
        installed = Version(metadata.version(name)).base_version  # "2.13.0+cpu" -> "2.13.0"
        assert requirement.specifier.contains(installed), (name, installed, requirement)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for dependency in map(Requirement, project["dependencies"]):
        assert canonicalize_name(dependency.name) in pins, dependency.name
    assert "pip install --quiet -e ~/raykd" in commands


# --- the README ---------------------------------------------------------------------------


def readme_section(title="Run on AWS"):
    """The README section under ``## <title>``, or None while the README lacks it."""
    readme = REPO / "README.md"
    text = readme.read_text() if readme.exists() else ""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    return match.group(1) if match else None


def test_readme_commands_launch_the_validated_config(monkeypatch, tmp_path):
    section = readme_section()
    if section is None:
        pytest.skip('README.md has no "## Run on AWS" section yet (text in notes, to be merged)')
    (config_path,) = re.findall(r"^\s*ray up (\S+)\s*$", section, re.M)
    assert (REPO / config_path).resolve() == CLUSTER_YAML
    (setup_line,) = re.findall(r"^\s*python (cluster/aws_setup\.py .+?)\s*$", section, re.M)
    script, *setup_args = shlex.split(setup_line)
    assert (REPO / script).resolve() == SETUP_SCRIPT
    options = dict(zip(setup_args[::2], setup_args[1::2]))
    # The sweep writes where the instance profiles may write, in the cluster's region.
    assert set(re.findall(r"--storage s3://([^/\s'\"]+)/", section)) == {options["--bucket"]}
    assert options["--region"] == REGION

    # The setup writes the group id into the cluster config itself: `ray up` reads it unedited.
    written = tmp_path / "aws.yaml"
    written.write_text(CLUSTER_YAML.read_text())
    with offline_account(monkeypatch, tmp_path, managed_policies=True) as account:
        aws_setup.main([*setup_args, "--cluster-config", str(written)])
        (group,) = account.ec2.describe_security_groups(
            GroupNames=[aws_setup.SECURITY_GROUP_NAME]
        )["SecurityGroups"]
        assert written.read_text() == CLUSTER_YAML.read_text().replace(
            SECURITY_GROUP_PLACEHOLDER, group["GroupId"]
        )
        prepared = prepare_config(cluster_config(path=written))
        validate_config(prepared)
        resolved = ray_aws_config.bootstrap_aws(prepared)
        used = {g for node in node_configs(resolved).values() for g in node["SecurityGroupIds"]}
        groups = account.ec2.describe_security_groups(GroupIds=sorted(used))["SecurityGroups"]
        assert_only_ssh_from(groups, options["--ssh-cidr"])
