"""tlmat: reproducible transfer learning for crystal property prediction with GNNs."""

__version__ = "0.1.0"
