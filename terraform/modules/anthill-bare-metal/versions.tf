terraform {
  # terraform_data (1.4) and optional object attributes with defaults (1.3); no provider.
  required_version = ">= 1.5"
}
