"""The built-in architectures; importing this package registers them.

One module per architecture, each registering an encoder and a decoder under the same
name. Third-party architectures use the same decorators (see fastvae.models.registry).
"""

from . import conv, mlp, resnet  # noqa: F401  (imported for their registrations)
