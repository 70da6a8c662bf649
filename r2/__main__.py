from r2.cli import main

main()
