# Three nodes in three locations of Hetzner Cloud's eu-central zone, from a snapshot holding
# Anthill (docs/clouds.md). Validated offline by CI with the hcloud provider the installer
# builds; never applied here (no Hetzner account).

provider "hcloud" {
  token = var.hcloud_token
}

module "anthill" {
  source = "../../modules/anthill-hetzner"

  name          = "anthill"
  nodes         = 3
  founders      = 3
  image         = var.image
  locations     = ["fsn1", "nbg1", "hel1"]
  client_cidrs  = var.client_cidrs
  metrics_cidrs = var.client_cidrs
  ssh_cidrs     = var.ssh_cidrs
  ssh_keys      = var.ssh_keys
}

output "client_endpoints" {
  value = module.anthill.client_endpoints
}

output "public_addresses" {
  value = module.anthill.public_addresses
}

output "status_command" {
  value = module.anthill.status_command
}
