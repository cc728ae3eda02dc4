# Three nodes in three zones of one region, from the image built by packer/ (docs/clouds.md).
# Not applied by this project's CI (no GCP project): `terraform fmt` only.

provider "google" {
  project = var.project
  region  = var.region
}

module "anthill" {
  source = "../../modules/anthill-gcp"

  name           = "anthill"
  nodes          = 3
  founders       = 3
  project        = var.project
  region         = var.region
  zones          = ["${var.region}-a", "${var.region}-b", "${var.region}-c"]
  image          = "projects/${var.project}/global/images/family/anthill"
  network        = var.network
  subnetwork     = var.subnetwork
  client_ranges  = var.client_ranges
  metrics_ranges = var.client_ranges
}

output "client_endpoints" {
  value = module.anthill.client_endpoints
}

output "status_command" {
  value = module.anthill.status_command
}
