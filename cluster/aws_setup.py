"""One-time AWS setup that cluster/aws.yaml relies on: a security group and two instance profiles.

Ray's launcher cannot be told to do either safely: a security group it creates always gets
SSH open to 0.0.0.0/0 (rules in ``provider.security_group`` are added next to that rule, not
instead of it), and the worker nodes it starts get no IAM role, so they could not write Tune
results to S3. This script creates both, idempotently:

- security group ``raykd-cluster``: SSH from one CIDR, all traffic between its members,
  nothing else (so the dashboard 8265, GCS 6379 and client port 10001 stay cluster-internal);
- instance profile ``raykd-head``: the EC2 calls Ray's autoscaler makes (``HEAD_AUTOSCALER_ACTIONS``,
  not Ray's default ``AmazonEC2FullAccess``), read/write on the results bucket, and permission
  to pass ``raykd-worker``, and only that role, to EC2 for the workers it launches;
- instance profile ``raykd-worker``: read/write on the results bucket, nothing else.

Usage (run again whenever your IP changes; it replaces the SSH rule):

    python cluster/aws_setup.py --region us-east-2 --ssh-cidr 203.0.113.7/32 \
        --bucket my-raykd-results

The SSH source must be one host or a narrow network (IPv4 /16 or narrower, IPv6 /48 or
narrower); anything wider needs ``--allow-wide-ssh``.

It writes the security group id into cluster/aws.yaml (``--cluster-config``), so
``ray up cluster/aws.yaml`` needs no hand edit.
"""
import argparse
import ipaddress
import json
import os
import re
from pathlib import Path

import boto3

SECURITY_GROUP_NAME = "raykd-cluster"
HEAD_PROFILE = "raykd-head"
WORKER_PROFILE = "raykd-worker"
# What Ray's default head role carries; replaced by HEAD_AUTOSCALER_ACTIONS (and detached on rerun).
EC2_FULL_ACCESS = "arn:aws:iam::aws:policy/AmazonEC2FullAccess"
# The EC2 calls the head's autoscaler makes, read from Ray's AWS node provider
# (ray/autoscaler/_private/aws/node_provider.py, Ray 2.60): instances.filter and
# wait_until_stopped -> DescribeInstances; describe_instance_types; describe_images;
# create_instances -> RunInstances (tags given at launch need CreateTags); create_tags;
# start_instances / stop_instances (reusing stopped nodes, cache_stopped_nodes);
# terminate_instances. Key pair, security group, subnets and profiles are resolved by
# `ray up` on the user's machine (bootstrap_aws), not by the head.
HEAD_AUTOSCALER_ACTIONS = (
    "ec2:CreateTags",
    "ec2:DescribeImages",
    "ec2:DescribeInstanceTypes",
    "ec2:DescribeInstances",
    "ec2:RunInstances",
    "ec2:StartInstances",
    "ec2:StopInstances",
    "ec2:TerminateInstances",
)
# Narrowest SSH sources refused without --allow-wide-ssh: wider than these prefixes.
NARROWEST_WIDE_PREFIX = {4: 16, 6: 48}
EC2_TRUST_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Principal": {"Service": "ec2.amazonaws.com"},
            "Action": "sts:AssumeRole",
        }
    ],
}
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
CLUSTER_CONFIG = Path(__file__).resolve().parent / "aws.yaml"
# The one line of the cluster config naming the group; every node type refers to its anchor.
SECURITY_GROUP_LINE = re.compile(r"^(\s*SecurityGroupIds: &cluster_security_group )\[[^\]\n]*\]", re.M)


def ssh_network(ssh_cidr, allow_wide=False):
    """Parse ``ssh_cidr``; refuse anything malformed, and a network wider than IPv4 /16
    (IPv6 /48) unless ``allow_wide`` (never the whole internet, /0)."""
    try:
        network = ipaddress.ip_network(ssh_cidr, strict=True)
    except ValueError as error:
        raise ValueError(f"--ssh-cidr {ssh_cidr!r} is not a CIDR block: {error}") from None
    if network.prefixlen == 0:
        raise ValueError(
            f"--ssh-cidr {ssh_cidr!r} opens SSH to the whole internet; give your own IP/32"
        )
    narrowest = NARROWEST_WIDE_PREFIX[network.version]
    if network.prefixlen < narrowest and not allow_wide:
        raise ValueError(
            f"--ssh-cidr {ssh_cidr!r} opens SSH to {network.num_addresses} addresses; give your "
            f"own IP (/{network.max_prefixlen}) or a network of /{narrowest} or narrower, "
            f"or pass --allow-wide-ssh"
        )
    return network


def head_launch_policy(worker_role_arn):
    """IAM policy document for the head: the autoscaler's EC2 calls, and passing the worker
    role (nothing else) to EC2 (nothing else)."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "RayAutoscaler",
                "Effect": "Allow",
                "Action": list(HEAD_AUTOSCALER_ACTIONS),
                "Resource": "*",
            },
            {
                "Sid": "PassWorkerRoleToEC2",
                "Effect": "Allow",
                "Action": "iam:PassRole",
                "Resource": worker_role_arn,
                "Condition": {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}},
            },
        ],
    }


def results_bucket_policy(bucket):
    """IAM policy document allowing Tune to list, read, write and delete in ``bucket``."""
    if not BUCKET_NAME.match(bucket):
        raise ValueError(f"--bucket {bucket!r} is not a valid S3 bucket name")
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
                "Resource": f"arn:aws:s3:::{bucket}",
            },
            {
                "Effect": "Allow",
                "Action": [
                    "s3:GetObject",
                    "s3:PutObject",
                    "s3:DeleteObject",
                    "s3:AbortMultipartUpload",
                ],
                "Resource": f"arn:aws:s3:::{bucket}/*",
            },
        ],
    }


def _ingress_atoms(ip_permissions):
    """Split EC2 ingress permissions into (protocol, from_port, to_port, (source kind, source))."""
    source_lists = {
        "IpRanges": "CidrIp",
        "Ipv6Ranges": "CidrIpv6",
        "UserIdGroupPairs": "GroupId",
        "PrefixListIds": "PrefixListId",
    }
    atoms = set()
    for permission in ip_permissions:
        protocol = permission["IpProtocol"]
        # "All traffic" rules carry no ports (some API answers spell them -1).
        if protocol == "-1":
            ports = (protocol, None, None)
        else:
            ports = (protocol, permission.get("FromPort"), permission.get("ToPort"))
        for list_key, kind in source_lists.items():
            for source in permission.get(list_key, []):
                atoms.add((*ports, (kind, source[kind])))
    return atoms


def _permission(atom):
    """Turn one atom from ``_ingress_atoms`` back into an EC2 IpPermission."""
    protocol, from_port, to_port, (kind, source) = atom
    list_key = {
        "CidrIp": "IpRanges",
        "CidrIpv6": "Ipv6Ranges",
        "GroupId": "UserIdGroupPairs",
        "PrefixListId": "PrefixListIds",
    }[kind]
    permission = {"IpProtocol": protocol, list_key: [{kind: source}]}
    if from_port is not None:
        permission.update(FromPort=from_port, ToPort=to_port)
    return permission


def ensure_security_group(ec2, ssh_cidr, vpc_id=None, allow_wide_ssh=False):
    """Create or update ``raykd-cluster`` so its ingress is exactly SSH from ``ssh_cidr``
    plus all traffic from its own members; return the group id.

    ``ec2`` is a boto3 EC2 client; ``vpc_id`` defaults to the region's default VPC.
    """
    network = ssh_network(ssh_cidr, allow_wide_ssh)
    if vpc_id is None:
        vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise ValueError("this region has no default VPC; pass --vpc-id")
        vpc_id = vpcs[0]["VpcId"]
    found = ec2.describe_security_groups(
        Filters=[
            {"Name": "vpc-id", "Values": [vpc_id]},
            {"Name": "group-name", "Values": [SECURITY_GROUP_NAME]},
        ]
    )["SecurityGroups"]
    if found:
        group_id, current = found[0]["GroupId"], _ingress_atoms(found[0]["IpPermissions"])
    else:
        group_id = ec2.create_security_group(
            GroupName=SECURITY_GROUP_NAME,
            Description="raykd Ray cluster: SSH from one CIDR, all traffic between members",
            VpcId=vpc_id,
        )["GroupId"]
        current = set()

    cidr_kind = "CidrIp" if network.version == 4 else "CidrIpv6"
    wanted = {
        ("tcp", 22, 22, (cidr_kind, str(network))),
        ("-1", None, None, ("GroupId", group_id)),
    }
    # Revoke only what is not wanted, so running clusters keep their intra-group rule.
    stale, missing = current - wanted, wanted - current
    if stale:
        ec2.revoke_security_group_ingress(
            GroupId=group_id, IpPermissions=[_permission(atom) for atom in sorted(stale, key=str)]
        )
    if missing:
        ec2.authorize_security_group_ingress(
            GroupId=group_id,
            IpPermissions=[_permission(atom) for atom in sorted(missing, key=str)],
        )
    return group_id


def _ensure_role_with_profile(iam, name):
    """Create role ``name`` (assumable by EC2) and the instance profile holding it;
    return the role's ARN."""
    try:
        role_arn = iam.get_role(RoleName=name)["Role"]["Arn"]
    except iam.exceptions.NoSuchEntityException:
        role_arn = iam.create_role(
            RoleName=name, AssumeRolePolicyDocument=json.dumps(EC2_TRUST_POLICY)
        )["Role"]["Arn"]
    try:
        profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    except iam.exceptions.NoSuchEntityException:
        profile = iam.create_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    if name not in [role["RoleName"] for role in profile["Roles"]]:
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
    return role_arn


def ensure_instance_profiles(iam, bucket):
    """Create or update the ``raykd-head`` and ``raykd-worker`` instance profiles for ``bucket``.

    ``iam`` is a boto3 IAM client. Returns ``{"head": name, "worker": name}``.
    """
    bucket_policy = json.dumps(results_bucket_policy(bucket))
    worker_role_arn = _ensure_role_with_profile(iam, WORKER_PROFILE)
    iam.put_role_policy(
        RoleName=WORKER_PROFILE, PolicyName="raykd-results", PolicyDocument=bucket_policy
    )

    _ensure_role_with_profile(iam, HEAD_PROFILE)
    attached = iam.list_attached_role_policies(RoleName=HEAD_PROFILE)["AttachedPolicies"]
    if EC2_FULL_ACCESS in [policy["PolicyArn"] for policy in attached]:  # left by an older setup
        iam.detach_role_policy(RoleName=HEAD_PROFILE, PolicyArn=EC2_FULL_ACCESS)
    iam.put_role_policy(
        RoleName=HEAD_PROFILE, PolicyName="raykd-results", PolicyDocument=bucket_policy
    )
    # EC2 refuses to launch an instance with a role the launcher may not pass.
    iam.put_role_policy(
        RoleName=HEAD_PROFILE,
        PolicyName="raykd-launch-workers",
        PolicyDocument=json.dumps(head_launch_policy(worker_role_arn)),
    )
    return {"head": HEAD_PROFILE, "worker": WORKER_PROFILE}


def security_group_line(cluster_config):
    """Check that ``cluster_config`` has the one line the group id goes into; return its text."""
    path = Path(cluster_config)
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"--cluster-config {path}: {error.strerror}") from None
    if len(SECURITY_GROUP_LINE.findall(text)) != 1:
        raise ValueError(
            f"--cluster-config {path}: needs exactly one line "
            "'SecurityGroupIds: &cluster_security_group [...]' to write the group id into"
        )
    return text


def write_security_group(cluster_config, group_id):
    """Put ``group_id`` into the cluster config's security group line (comments and all else kept)."""
    path = Path(cluster_config)
    text = SECURITY_GROUP_LINE.sub(rf"\g<1>[{group_id}]", security_group_line(path))
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text)
    os.replace(staging, path)


def main(argv=None):
    """Command line: set up the security group and instance profiles, write the group id into the cluster config."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--region", required=True, help="AWS region, as in cluster/aws.yaml")
    parser.add_argument("--ssh-cidr", required=True, help="who may SSH in, e.g. your IP/32")
    parser.add_argument("--bucket", required=True, help="S3 bucket the sweep writes to")
    parser.add_argument("--vpc-id", help="VPC for the security group (default: the default VPC)")
    parser.add_argument("--allow-wide-ssh", action="store_true",
                        help="accept an SSH source wider than IPv4 /16 (IPv6 /48)")
    parser.add_argument("--cluster-config", default=str(CLUSTER_CONFIG),
                        help="the cluster YAML that gets the group id (default: cluster/aws.yaml)")
    args = parser.parse_args(argv)

    # Validate every input before touching the account.
    ssh_network(args.ssh_cidr, args.allow_wide_ssh)
    results_bucket_policy(args.bucket)
    security_group_line(args.cluster_config)
    group_id = ensure_security_group(
        boto3.client("ec2", region_name=args.region), args.ssh_cidr, args.vpc_id, args.allow_wide_ssh
    )
    profiles = ensure_instance_profiles(boto3.client("iam", region_name=args.region), args.bucket)
    write_security_group(args.cluster_config, group_id)
    print(
        f"security group {group_id} ({SECURITY_GROUP_NAME}): SSH from {args.ssh_cidr}, "
        "all traffic between cluster nodes, nothing else\n"
        f"instance profiles: {profiles['head']} (head), {profiles['worker']} (workers), "
        f"read/write on s3://{args.bucket}\n"
        f"{args.cluster_config} now uses {group_id}: ray up {args.cluster_config}"
    )


if __name__ == "__main__":
    main()
