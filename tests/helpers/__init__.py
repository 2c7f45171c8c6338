"""What the tests share: tiny models, eager references, data folders, the gloo rank workers, import graphs."""
