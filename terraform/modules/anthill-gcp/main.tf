# An Anthill cluster on Compute Engine from the image of packer/ (docs/clouds.md): one internal
# address per node first (every node's configuration then lists every member), the instances
# spread over the zones, each configured by its startup script (its node.yaml written at first
# boot, the node started), firewall rules that open only the cluster's ports. Not applied here
# (no GCP project): written to the provider's documented schema, formatted by CI; see
# docs/clouds.md for what was checked.

locals {
  members = [for i in range(var.nodes) : {
    name    = "${var.name}-${i + 1}"
    address = google_compute_address.node[i].address
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
  tls                = { dir = local.tls_dir, server_name = local.tls_server_name }
}

resource "google_compute_address" "node" {
  count        = var.nodes
  project      = var.project
  region       = var.region
  name         = "${var.name}-${count.index + 1}"
  subnetwork   = var.subnetwork
  address_type = "INTERNAL"
}

resource "google_compute_firewall" "nodes" {
  project     = var.project
  name        = "${var.name}-nodes"
  network     = var.network
  description = "Anthill ${var.name}: gRPC and replication between the nodes"
  source_tags = [var.name]
  target_tags = [var.name]
  allow {
    protocol = "tcp"
    ports    = ["7400"]
  }
}

resource "google_compute_firewall" "clients" {
  count         = length(var.client_ranges) > 0 ? 1 : 0
  project       = var.project
  name          = "${var.name}-clients"
  network       = var.network
  description   = "Anthill ${var.name}: gRPC from clients"
  source_ranges = var.client_ranges
  target_tags   = [var.name]
  allow {
    protocol = "tcp"
    ports    = ["7400"]
  }
}

resource "google_compute_firewall" "metrics" {
  count         = length(var.metrics_ranges) > 0 ? 1 : 0
  project       = var.project
  name          = "${var.name}-metrics"
  network       = var.network
  description   = "Anthill ${var.name}: Prometheus metrics"
  source_ranges = var.metrics_ranges
  target_tags   = [var.name]
  allow {
    protocol = "tcp"
    ports    = ["7401"]
  }
}

resource "google_compute_firewall" "ssh" {
  count         = length(var.ssh_ranges) > 0 ? 1 : 0
  project       = var.project
  name          = "${var.name}-ssh"
  network       = var.network
  description   = "Anthill ${var.name}: SSH"
  source_ranges = var.ssh_ranges
  target_tags   = [var.name]
  allow {
    protocol = "tcp"
    ports    = ["22"]
  }
}

resource "google_compute_instance" "node" {
  count        = var.nodes
  project      = var.project
  name         = "${var.name}-${count.index + 1}"
  zone         = var.zones[count.index % length(var.zones)]
  machine_type = var.machine_type
  tags         = [var.name]
  labels       = merge(var.labels, { anthill-cluster = var.name })

  boot_disk {
    initialize_params {
      image = var.image
      size  = var.disk_gb
      type  = "pd-ssd"
    }
  }

  network_interface {
    subnetwork = var.subnetwork
    network_ip = google_compute_address.node[count.index].address
  }

  shielded_instance_config {
    enable_secure_boot          = true
    enable_integrity_monitoring = true
  }

  metadata = {
    block-project-ssh-keys = length(var.ssh_ranges) == 0 ? "true" : "false"
  }
  metadata_startup_script = templatefile("${path.module}/startup.sh.tftpl", {
    node_yaml    = module.config.yaml["${var.name}-${count.index + 1}"]
    consul_token = var.consul_token
    tls_files    = module.config.tls_files["${var.name}-${count.index + 1}"]
  })
  # Nothing here replaces or restarts running nodes: a replaced machine loses its event log (on
  # its root disk), and every node would go at once. A new member list, image or machine type
  # is rolled one node at a time, drained, by the playbooks or by hand (docs/clouds.md).
  lifecycle {
    ignore_changes = [metadata_startup_script, boot_disk, machine_type]
    precondition {
      condition     = terraform_data.tls_fixed.output == var.tls.enabled
      error_message = "tls.enabled is fixed at the first apply (the machines' user data is written once; nodes with and without TLS cannot talk). A cluster made before TLS existed sets tls = { enabled = false }."
    }
  }
}
