# An Anthill cluster on Hetzner Cloud (docs/clouds.md): a private network where node i has the
# fixed address 10 + i (so every node's configuration lists every member before any boots), the
# servers spread over the locations and a spread placement group in each, configured by cloud-init
# (the node-config module's user data), a firewall that opens only the cluster's ports. Not
# applied here (no Hetzner account); `terraform validate`d offline with the hcloud provider the
# installer builds.

locals {
  members = [for i in range(var.nodes) : {
    name    = "${var.name}-${i + 1}"
    address = cidrhost(var.ip_range, 11 + i)
    raft_id = i + 1
  }]
  # The founders as first applied (nodes added later join; see terraform_data.founders).
  founders = terraform_data.founders.output
  # TLS files (docs/clouds.md "TLS"); empty: TLS off.
  tls_dir         = var.tls.enabled ? abspath(var.tls.dir != "" ? var.tls.dir : "${path.root}/anthill-tls") : ""
  tls_server_name = var.tls.server_name != "" ? var.tls.server_name : var.name
  # Hetzner's firewalls apply to the public interfaces only: the nodes talk over the private
  # network, which no rule filters.
  rule = {
    clients = { port = "7400", source_ips = var.client_cidrs }
    metrics = { port = "7401", source_ips = var.metrics_cidrs }
    ssh     = { port = "22", source_ips = var.ssh_cidrs }
  }
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

resource "hcloud_network" "cluster" {
  name     = var.name
  ip_range = var.ip_range
  labels   = var.labels
}

resource "hcloud_network_subnet" "cluster" {
  network_id   = hcloud_network.cluster.id
  type         = "cloud"
  network_zone = var.network_zone
  ip_range     = var.ip_range
}

# One spread group per location the nodes use (a spread group holds at most 10 servers).
resource "hcloud_placement_group" "spread" {
  for_each = toset([for i in range(var.nodes) : var.locations[i % length(var.locations)]])
  name     = "${var.name}-${each.key}"
  type     = "spread"
  labels   = var.labels
}

resource "hcloud_firewall" "cluster" {
  name   = var.name
  labels = var.labels

  dynamic "rule" {
    for_each = { for k, r in local.rule : k => r if length(r.source_ips) > 0 }
    content {
      description = rule.key
      direction   = "in"
      protocol    = "tcp"
      port        = rule.value.port
      source_ips  = rule.value.source_ips
    }
  }
}

resource "hcloud_server" "node" {
  count              = var.nodes
  name               = "${var.name}-${count.index + 1}"
  image              = var.image
  server_type        = var.server_type
  location           = var.locations[count.index % length(var.locations)]
  placement_group_id = hcloud_placement_group.spread[var.locations[count.index % length(var.locations)]].id
  firewall_ids       = [hcloud_firewall.cluster.id]
  ssh_keys           = var.ssh_keys
  labels             = merge(var.labels, { "anthill-cluster" = var.name })
  user_data          = module.config.cloud_init["${var.name}-${count.index + 1}"]

  network {
    network_id = hcloud_network.cluster.id
    ip         = local.members[count.index].address
  }

  # Nothing here replaces or restarts running nodes: a replaced machine loses its event log (on
  # its root disk), and every node would go at once. A new member list, image or server type
  # is rolled one node at a time, drained, by the playbooks or by hand (docs/clouds.md).
  lifecycle {
    ignore_changes = [user_data, image, server_type]
    precondition {
      condition     = terraform_data.tls_fixed.output == var.tls.enabled
      error_message = "tls.enabled is fixed at the first apply (the machines' user data is written once; nodes with and without TLS cannot talk). A cluster made before TLS existed sets tls = { enabled = false }."
    }
  }

  depends_on = [hcloud_network_subnet.cluster]
}
