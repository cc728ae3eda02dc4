output "yaml" {
  description = "Each member's configuration, by name, as YAML."
  value       = { for name, config in local.configs : name => yamlencode(config) }
}

output "cloud_init" {
  description = "Each member's cloud-init user data, by name: its configuration (and the Consul token) written at first boot, then its node started (the image's unit waits for the configuration)."
  sensitive   = true
  value = { for name, config in local.configs : name => templatefile("${path.module}/cloud-init.yaml.tftpl", {
    node_yaml    = yamlencode(config)
    consul_token = var.consul_token
  }) }
}
