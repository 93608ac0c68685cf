"""Optional integrations with other libraries. Each module imports its library when it is imported
itself; `import fused_softmax` imports none of them."""
