"""Code shared by every hoosh service. Generated contracts live beside it in the ``hoosh`` package."""
