# Three nodes in three availability zones of one region, from the AMI built by packer/
# (docs/clouds.md). Not applied by this project's CI (no AWS account): `terraform fmt` only.

provider "aws" {
  region = var.region
}

module "anthill" {
  source = "../../modules/anthill-aws"

  name          = "anthill"
  nodes         = 3
  founders      = 3
  image_id      = var.image_id
  vpc_id        = var.vpc_id
  subnet_ids    = var.subnet_ids
  client_cidrs  = var.client_cidrs
  metrics_cidrs = var.client_cidrs
  tags          = { "app.kubernetes.io/part-of" = "anthill" }
}

output "client_endpoints" {
  value = module.anthill.client_endpoints
}

output "status_command" {
  value = module.anthill.status_command
}
