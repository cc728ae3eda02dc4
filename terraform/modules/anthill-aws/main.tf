# An Anthill cluster on EC2 from the image of packer/ (docs/clouds.md): one network interface
# per node first (its private address is then known, and every node's configuration can list
# every member), the instances spread over the subnets' zones and a spread placement group,
# each configured by cloud-init (its node.yaml written, the node started), a security group that
# opens only the cluster's ports. Not applied here (no AWS account): written to the provider's
# documented schema, formatted by CI; see docs/clouds.md for what was checked.

locals {
  members = [for i in range(var.nodes) : {
    name    = "${var.name}-${i + 1}"
    address = aws_network_interface.node[i].private_ip
    raft_id = i + 1
  }]
  # The founders as first applied (nodes added later join; see terraform_data.founders).
  founders = terraform_data.founders.output
  # TLS files (docs/clouds.md "TLS"); empty: TLS off.
  tls_dir         = var.tls.enabled ? abspath(var.tls.dir != "" ? var.tls.dir : "${path.root}/anthill-tls") : ""
  tls_server_name = var.tls.server_name != "" ? var.tls.server_name : var.name
}

# The first nodes of the first apply found the cluster, and stay its founders: a node added
# later must join, not found a second cluster beside the first.
resource "terraform_data" "founders" {
  input = [for i in range(var.founders) : "${var.name}-${i + 1}"]
  lifecycle {
    ignore_changes = [input]
    precondition {
      condition     = var.founders >= 1 && var.founders <= var.nodes
      error_message = "founders: 1 to nodes (the first apply's node count; never change it)."
    }
  }
}

# TLS on or off as at the first apply: a later switch would reach only machines made after it
# (the user data is written once), and nodes with and without TLS cannot talk.
resource "terraform_data" "tls_fixed" {
  input = var.tls.enabled
  lifecycle {
    ignore_changes = [input]
  }
}

module "config" {
  source             = "../anthill-node-config"
  members            = local.members
  founders           = local.founders
  partitions         = var.partitions
  replication_factor = var.replication_factor
  coordination       = var.coordination
  config_overrides   = var.config_overrides
  consul_token       = var.consul_token
  tls                = { dir = local.tls_dir, server_name = local.tls_server_name }
}

resource "aws_security_group" "cluster" {
  name        = var.name
  description = "Anthill ${var.name}: gRPC between the nodes and from the clients, metrics, SSH"
  vpc_id      = var.vpc_id
  tags        = merge(var.tags, { Name = var.name })
}

resource "aws_vpc_security_group_ingress_rule" "nodes" {
  security_group_id            = aws_security_group.cluster.id
  description                  = "gRPC and replication between the nodes"
  referenced_security_group_id = aws_security_group.cluster.id
  ip_protocol                  = "tcp"
  from_port                    = 7400
  to_port                      = 7400
}

resource "aws_vpc_security_group_ingress_rule" "clients" {
  for_each          = toset(var.client_cidrs)
  security_group_id = aws_security_group.cluster.id
  description       = "gRPC from clients"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 7400
  to_port           = 7400
}

resource "aws_vpc_security_group_ingress_rule" "metrics" {
  for_each          = toset(var.metrics_cidrs)
  security_group_id = aws_security_group.cluster.id
  description       = "Prometheus metrics"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 7401
  to_port           = 7401
}

resource "aws_vpc_security_group_ingress_rule" "ssh" {
  for_each          = toset(var.ssh_cidrs)
  security_group_id = aws_security_group.cluster.id
  description       = "SSH"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22
}

resource "aws_vpc_security_group_egress_rule" "all" {
  security_group_id = aws_security_group.cluster.id
  description       = "Outbound (package mirrors, time, Consul)"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "-1"
}

resource "aws_placement_group" "spread" {
  name     = var.name
  strategy = "spread"
  tags     = var.tags
}

resource "aws_network_interface" "node" {
  count           = var.nodes
  subnet_id       = var.subnet_ids[count.index % length(var.subnet_ids)]
  security_groups = [aws_security_group.cluster.id]
  tags            = merge(var.tags, { Name = "${var.name}-${count.index + 1}" })
}

resource "aws_instance" "node" {
  count           = var.nodes
  ami             = var.image_id
  instance_type   = var.instance_type
  key_name        = var.ssh_key_name
  placement_group = aws_placement_group.spread.id

  network_interface {
    network_interface_id = aws_network_interface.node[count.index].id
    device_index         = 0
  }

  root_block_device {
    volume_size = var.data_volume_gb
    volume_type = "gp3"
    encrypted   = true
  }

  metadata_options {
    http_tokens = "required"
  }

  user_data = module.config.cloud_init["${var.name}-${count.index + 1}"]
  # Nothing here replaces or restarts running nodes: a replaced machine loses its event log (on
  # its root disk), and every node would go at once. A new member list, image or machine type
  # is rolled one node at a time, drained, by the playbooks or by hand (docs/clouds.md).
  lifecycle {
    ignore_changes = [user_data, ami, instance_type]
    precondition {
      condition     = terraform_data.tls_fixed.output == var.tls.enabled
      error_message = "tls.enabled is fixed at the first apply (the machines' user data is written once; nodes with and without TLS cannot talk). A cluster made before TLS existed sets tls = { enabled = false }."
    }
  }

  tags = merge(var.tags, { Name = "${var.name}-${count.index + 1}", "anthill:cluster" = var.name })
}
