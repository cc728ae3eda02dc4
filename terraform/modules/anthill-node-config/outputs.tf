output "yaml" {
  description = "Each member's configuration, by name, as YAML."
  value       = { for name, config in local.configs : name => yamlencode(config) }
}
