"""Allow ``python -m proxy`` as an alias of the ``beanstalk-proxy`` console script."""

from proxy.cli import main

if __name__ == "__main__":
    main()
